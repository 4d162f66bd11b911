"""Offload modes: where the transformer's weights live while it runs.

``none`` keeps everything on the GPU; ``model`` keeps one model (transformer,
text encoder, image encoder, VAE) on the GPU at a time; ``sequential`` streams
the transformer's blocks one by one from page-locked host memory
(:class:`BlockStreamer`). The memory each mode needs is ``budget``'s business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of import time for the CLI
    import torch

    from .wan_transformer import WanTransformer3DModel


class BlockStreamer:
    """Streams the transformer's blocks to ``device`` one ahead of use (``offload="sequential"``).

    The blocks' weights live in CPU memory (page-locked on CUDA, so copies run
    asynchronously). Just before block ``i`` runs, its weights are on the device
    (the compute waits for their copy only) and the copy of block ``i + 1``
    (wrapping to block 0 for the next forward) starts on a separate stream, so
    the transfer overlaps block ``i``'s compute: at most two blocks are on the
    device at a time. After block ``i`` the device copy is dropped, not copied
    back: the CPU weights are unchanged, so leaving costs nothing.
    Everything that is not a block (embeddings, control branch, head) stays
    resident. :meth:`release` drops what is still on the device.
    """

    def __init__(self, model: "WanTransformer3DModel", device: "torch.device"):
        import torch

        self.device = torch.device(device)
        self.blocks = [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        in_blocks = {id(t) for block in self.blocks for t in (*block.parameters(), *block.buffers())}
        for child in model.children():
            if not isinstance(child, torch.nn.ModuleList):
                child.to(self.device)
        for t in (*model.parameters(recurse=False), *model.buffers(recurse=False)):  # e.g. the head's scale_shift_table
            if id(t) not in in_blocks:
                t.data = t.data.to(self.device)
        # per block: its tensors (parameters and buffers) and their CPU data
        self._tensors = [list(block.parameters()) + list(block.buffers()) for block in self.blocks]
        pin = self._cuda
        for tensors in self._tensors:
            for t in tensors:
                t.data = t.data.to("cpu")
                if pin:
                    try:
                        t.data = t.data.pin_memory()
                    except RuntimeError:  # the system refused more page-locked memory: copy from pageable memory
                        pin = False
        self._host = [[t.data for t in tensors] for tensors in self._tensors]
        self._in_flight: dict[int, object] = {}  # block index -> copy-done event (None off CUDA)
        self.max_on_device = 0  # most blocks on the device at once (a check of the two-block bound)
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda module, args, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda module, args, output, i=i: self._after(i)))

    def _start_copy(self, i: int) -> None:
        import torch

        if i in self._in_flight:
            return
        if self._cuda:
            # the copy stream must not overwrite memory the compute stream is still reading
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                for t, host in zip(self._tensors[i], self._host[i]):
                    t.data = host.to(self.device, non_blocking=True, copy=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            for t, host in zip(self._tensors[i], self._host[i]):
                t.data = host.to(self.device, copy=True)  # a copy even on the CPU, so the streaming is observable
            event = None
        self._in_flight[i] = event
        self.max_on_device = max(self.max_on_device, len(self._in_flight))

    def _before(self, i: int) -> None:
        import torch

        self._start_copy(i)
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._in_flight[i])
            for t in self._tensors[i]:
                t.data.record_stream(compute)  # allocated on the copy stream, used here: free only after use
        self._start_copy((i + 1) % len(self.blocks))

    def _after(self, i: int) -> None:
        for t, host in zip(self._tensors[i], self._host[i]):
            t.data = host
        self._in_flight.pop(i, None)

    def release(self) -> None:
        """Drop every block's device copy (after the denoising loop: the memory goes to the VAE)."""
        for i in list(self._in_flight):
            self._after(i)

    def remove(self) -> None:
        """Undo the hooks; the blocks stay in (page-locked) CPU memory."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def enable_sequential_offload(model: "WanTransformer3DModel", device: "torch.device") -> BlockStreamer:
    """Stream ``model``'s blocks to ``device`` (see :class:`BlockStreamer`); the streamer is also kept
    as ``model.block_streamer``."""
    streamer = BlockStreamer(model, device)
    model.block_streamer = streamer
    return streamer


# -- GPU memory ---------------------------------------------------------------------------------

#: Offload modes, from fastest to leanest: everything resident; one model (transformer, text
#: encoder, image encoder, VAE) on the GPU at a time; the transformer's blocks streamed one by one.
OFFLOAD_MODES = ("none", "model", "sequential")
