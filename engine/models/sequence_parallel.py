"""One transformer forward across the processes of a ``torchrun`` launch: Ulysses sequence parallelism.

``torchrun --nproc_per_node N -m keyframe_worlds.cli run|model check|model check-pipeline ...`` starts N
copies of the command. :func:`launch` joins them into one process group (from torchrun's ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; NCCL on ``cuda:LOCAL_RANK``, gloo on the
CPU). Rank 0, the *driver*, runs the command as it would alone (reading inputs, the job runner, the
pipeline's text/image encoders, VAE and sampler, writing every output file). The other ranks, the
*followers*, only load the same transformer and :func:`serve` it: every transformer forward the driver
makes (``@shared_forward``) is first broadcast to them (its tensors, an unchanged one only once), and
then all ranks run it together. So a follower never writes a file and never draws noise: the noise,
like every other input, is the driver's.

Inside a forward (layout ``[B, L, H, Dh]``, ``P`` ranks, ``c = ceil(L / P)`` tokens a rank):

- after the patch embedding each rank keeps its slice of the tokens (:meth:`TokenShard.take`, zero
  padding to ``P c`` tokens so every slice has the same size), and of the rotary tables with them,
  so every rank rotates its tokens by their positions in the whole grid;
- everything per token (modulation, projections, cross-attention to the whole text/image context,
  which is not split, the MLP) runs on the slice;
- self-attention (:func:`attend_streams`): one all-to-all turns ``[B, c, H, Dh]`` q/k/v slices into
  ``[B, L, H/P, Dh]`` (every token, ``H/P`` heads), the padding is cut off, :func:`~.attention.attend`
  runs over the whole sequence, the padding is put back and a second all-to-all returns each rank its
  tokens with every head. The stereo memory's reference stream is a second stream with its own slice
  and padding; its tokens and the target's are exchanged in the same all-to-all and attended jointly,
  ``[references | targets]``, as on one process (their stitched rotary positions stay those of the
  whole ``F' x h' x 2w'`` grid, sliced like the tokens);
- before the output head the slices are gathered (:meth:`TokenShard.gather`).

Heads must divide by ``P``. Without a launch (or with one process) every helper here is the identity
and :func:`attend_streams` is one plain :func:`~.attention.attend`, so a single process computes exactly
what it always did. With ``KEYFRAME_WORLDS_SHARD_WEIGHTS=1`` the blocks are also sharded with FSDP2
(:func:`shard_weights`) at the first forward, so each rank keeps ``1/P`` of the block weights between
blocks; the weights are still loaded whole on each rank first (a load peak of the whole model).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError
from .attention import attend

#: Environment variables torchrun sets for every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Stream names of :func:`token_streams`: the target tokens (backbone and control branch, same grid)
#: and the stereo memory's reference tokens.
TARGET_STREAM = "target"
REFERENCE_STREAM = "reference"


class SequenceParallelError(KeyframeWorldsError):
    """A torchrun launch that cannot run sequence-parallel (environment, heads, device)."""


@dataclass(frozen=True)
class ParallelGroup:
    """This process's place in the launch: ``rank`` of ``world_size``; ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


_active: ParallelGroup | None = None


def active() -> ParallelGroup | None:
    """The launch this process belongs to, or None (a single process)."""
    return _active


def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many processes torchrun started (1 without torchrun)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SequenceParallelError(f"WORLD_SIZE must be an integer, got {environ.get('WORLD_SIZE')!r}") from None


def rank_device(requested: str, local_rank: int) -> torch.device:
    """The device of one rank for a command's ``--device``: ``auto``/``cuda``/``cuda:N`` become
    ``cuda:LOCAL_RANK`` (one GPU per process, as torchrun assigns them), ``cpu`` stays ``cpu``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise SequenceParallelError(f"--device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SequenceParallelError(f"device {requested!r} was asked for but this torch has no usable CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise SequenceParallelError(f"rank with LOCAL_RANK {local_rank} has no GPU of its own: this machine has "
                                        f"{torch.cuda.device_count()}; start at most that many processes per node")
        return torch.device("cuda", local_rank)
    if device.type != "cpu":
        raise SequenceParallelError(f"sequence parallelism runs on cuda or cpu devices, not {device.type!r}")
    return device


@contextlib.contextmanager
def launch(requested_device: str = "auto", environ: Mapping[str, str] | None = None) -> Iterator[ParallelGroup | None]:
    """Join the torchrun launch for the block (yields None when this is a single process).

    Sets up the default process group (NCCL on CUDA, gloo on the CPU), makes it :func:`active` and
    takes it down afterwards.
    """
    global _active
    environ = os.environ if environ is None else environ
    world = launched_world_size(environ)
    if world <= 1:
        yield None
        return
    missing = [name for name in TORCHRUN_ENV if name not in environ]
    if missing:
        raise SequenceParallelError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: start the command "
                                    "with torchrun --nproc_per_node N -m keyframe_worlds.cli ...")
    rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
    device = rank_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if _active is not None or dist.is_initialized():
        raise SequenceParallelError("this process already belongs to a sequence-parallel launch")
    global _shard_weights
    shard = wants_sharded_weights(environ)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
    _active, _shard_weights = ParallelGroup(rank, world, local_rank, device, backend), shard
    clean = False
    try:
        yield _active
        clean = True
    finally:
        # Every rank done with the group before any closes its connections (a rank whose peer hangs up
        # mid-message fails). The driver also waits after an error of its own between forwards (the
        # followers were told to stop); after one inside a forward it leaves at once, and torchrun ends
        # the followers, who are waiting in that forward's exchanges.
        if clean or (rank == 0 and not _driver_in_forward):
            dist.barrier()
        _active, _shard_weights = None, False
        dist.destroy_process_group()


# -- token slices ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenShard:
    """One rank's slice of a stream of ``length`` tokens: tokens ``[rank c, (rank + 1) c)`` of the stream
    zero-padded to ``world_size * c`` tokens, ``c = ceil(length / world_size)``."""

    length: int
    world_size: int = 1
    rank: int = 0

    @property
    def chunk(self) -> int:
        return math.ceil(self.length / self.world_size)

    @property
    def padded(self) -> int:
        return self.chunk * self.world_size

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's ``chunk`` tokens of ``x`` (``length`` tokens along ``dim``); ``x`` itself when alone."""
        if self.world_size == 1:
            return x
        return _pad_tokens(x, self.padded, dim).narrow(dim, self.rank * self.chunk, self.chunk)

    def take_rotary(self, rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables ``(cos, sin)`` ``[1, L, 1, Dh]`` of this rank's tokens."""
        return self.take(rotary[0]), self.take(rotary[1])

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's slice ``[.., chunk, ..]`` along ``dim`` -> the whole stream ``[.., length, ..]`` (on
        every rank)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.length)


def _pad_tokens(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, missing]
    return F.pad(x, pad)


def token_shard(length: int) -> TokenShard:
    """This process's slice of a stream of ``length`` tokens (the whole stream without a launch)."""
    group = active()
    return TokenShard(length) if group is None else TokenShard(length, group.world_size, group.rank)


_streams: ContextVar[Mapping[str, TokenShard] | None] = ContextVar("sequence_parallel_streams", default=None)


@contextlib.contextmanager
def token_streams(**shards: TokenShard) -> Iterator[None]:
    """Name the token streams of the forward under way (``target=...``, ``reference=...``), so the
    attention layers inside it know each stream's whole length (to cut the padding off)."""
    token = _streams.set(shards)
    try:
        yield
    finally:
        _streams.reset(token)


def local_tokens(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], stream: str = TARGET_STREAM):
    """``(tokens, rotary)`` of this rank for a ``[B, L, D]`` stream and its ``[1, L, 1, Dh]`` tables."""
    shard = _current_shard(stream)
    if shard is None:
        return x, rotary
    return shard.take(x), shard.take_rotary(rotary)


def _current_shard(stream: str) -> TokenShard | None:
    shards = _streams.get()
    if shards is None or stream not in shards or shards[stream].world_size == 1:
        return None
    return shards[stream]


# -- attention ------------------------------------------------------------------------------------

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def attend_streams(parts: Sequence[QKV], streams: Sequence[str] = (TARGET_STREAM,)) -> list[torch.Tensor]:
    """Joint self-attention over the streams ``parts`` (``(q, k, v)`` ``[B, L_i, H, Dh]`` each, this rank's
    tokens of stream ``streams[i]``): every token attends to every token of every part, in the order
    given. Returns each part's result ``[B, L_i, H, Dh]``.

    Alone: :func:`~.attention.attend` over the concatenated parts. In a launch: :func:`ulysses_attention`
    with the shards :func:`token_streams` named.
    """
    shards = [_current_shard(name) for name in streams]
    if all(s is None for s in shards):
        if len(parts) == 1:
            return [attend(*parts[0])]
        q, k, v = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
        return list(attend(q, k, v).split([p[0].shape[1] for p in parts], dim=1))
    if any(s is None for s in shards):
        raise SequenceParallelError(f"streams {list(streams)}: some are split across ranks and some are not")
    return ulysses_attention(parts, shards)


def ulysses_attention(parts: Sequence[QKV], shards: Sequence[TokenShard]) -> list[torch.Tensor]:
    """Ulysses attention: q/k/v slices ``[B, c_i, H, Dh]`` (``shards[i]``'s chunk of stream ``i``) ->
    this rank's slices of the joint attention result, through two all-to-alls of the default group.

    1. q, k, v of every stream, stacked, are sent head group ``j`` (``H/P`` heads) to rank ``j``; each
       rank receives every rank's tokens for its heads: ``[B, P c_i, H/P, Dh]``, cut to ``L_i``.
    2. :func:`~.attention.attend` over ``[stream 0 | stream 1 | ...]`` with ``H/P`` heads.
    3. The result, padded again, goes back: token chunk ``j`` to rank ``j``, ``[B, c_i, H, Dh]``.
    """
    world = shards[0].world_size
    batch, _, heads, head_dim = parts[0][0].shape
    if heads % world:
        raise SequenceParallelError(f"{heads} attention heads cannot be split over {world} ranks: start a number of "
                                    f"processes that divides {heads}")
    chunks = [s.chunk for s in shards]
    for (q, _, _), c in zip(parts, chunks):
        if q.shape[1] != c:
            raise SequenceParallelError(f"a rank holds {q.shape[1]} tokens of a stream where its slice is {c}")
    # [3, B, sum c_i, H, Dh]: one exchange for every stream's q, k and v
    local = torch.stack([torch.cat([p[i] for p in parts], dim=1) for i in range(3)])
    group_heads = heads // world
    send = local.unflatten(3, (world, group_heads)).movedim(3, 0).contiguous()  # [P, 3, B, sum c, H/P, Dh]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send)
    # received[r] = rank r's tokens for this rank's heads -> per stream [3, B, P c_i, H/P, Dh], cut to L_i
    per_rank = received.split(chunks, dim=3)
    full = [piece.movedim(0, 2).flatten(2, 3)[:, :, :s.length] for piece, s in zip(per_rank, shards)]
    q, k, v = (torch.cat([f[i] for f in full], dim=1) for i in range(3))
    out = attend(q, k, v)  # [B, sum L_i, H/P, Dh]
    # back: pad every stream to P c_i, send token chunk j to rank j
    outs = out.split([s.length for s in shards], dim=1)
    back = torch.cat([_pad_tokens(o, s.padded, 1).unflatten(1, (world, s.chunk)) for o, s in zip(outs, shards)],
                     dim=2).movedim(1, 0).contiguous()  # [P, B, sum c_i, H/P, Dh]
    returned = torch.empty_like(back)
    dist.all_to_all_single(returned, back)
    # returned[r] = this rank's tokens with rank r's heads -> [B, sum c_i, H, Dh]
    mine = returned.movedim(0, 2).flatten(2, 3)
    return list(mine.split(chunks, dim=1))


# -- driver and followers -------------------------------------------------------------------------

_STOP = "stop"
_FORWARD = "forward"
_serving = False
_shard_weights = False  # set by launch from SHARD_WEIGHTS_ENV
_driver_in_forward = False  # the driver is inside a shared forward (the followers are in its exchanges)


class _CallCache:
    """The driver's last tensor per argument, so an input that did not change (the render, the masks,
    the context) crosses to the followers once per call sequence, not once per step."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[torch.Tensor, int]] = {}
        self.received: dict[str, torch.Tensor] = {}
        self.forwards = 0  # forwards the driver shared since the launch began
        self.sharded_blocks = 0  # blocks shard_weights sharded in this process


_cache = _CallCache()


def _broadcast_tensor(value: torch.Tensor | None, meta: tuple, group: ParallelGroup) -> torch.Tensor:
    _, shape, dtype = meta
    if value is None:
        value = torch.empty(shape, dtype=dtype, device=group.device)
    else:
        value = value.detach().to(group.device).contiguous()
    dist.broadcast(value, src=0)
    return value


def _send_call(group: ParallelGroup, args: tuple, kwargs: dict) -> None:
    named = {f"#{i}": v for i, v in enumerate(args)} | dict(kwargs)
    meta: dict[str, tuple] = {}
    to_send: list[tuple[str, torch.Tensor]] = []
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            last = _cache.sent.get(name)
            if last is not None and last[0] is value and last[1] == value._version:
                meta[name] = ("same",)
                continue
            meta[name] = ("tensor", tuple(value.shape), value.dtype)
            to_send.append((name, value))
            _cache.sent[name] = (value, value._version)
        else:
            meta[name] = ("value", value)
    dist.broadcast_object_list([(_FORWARD, len(args), meta)], src=0, device=group.device)
    _cache.forwards += 1
    for name, value in to_send:
        _broadcast_tensor(value, meta[name], group)


def _receive_call(group: ParallelGroup, positional: int, meta: dict[str, tuple]) -> tuple[tuple, dict]:
    values: dict[str, Any] = {}
    for name, item in meta.items():
        if item[0] == "same":
            values[name] = _cache.received[name]
        elif item[0] == "tensor":
            values[name] = _cache.received[name] = _broadcast_tensor(None, item, group)
        else:
            values[name] = item[1]
    args = tuple(values.pop(f"#{i}") for i in range(positional))
    return args, values


def shared_forward(forward: Callable) -> Callable:
    """Decorate a model's ``forward``: on the driver of a launch each call is first sent to the
    followers (who are in :func:`serve`), so every rank runs it; elsewhere the forward as it is."""

    @functools.wraps(forward)
    def wrapper(module, *args, **kwargs):
        global _driver_in_forward
        group = active()
        if group is None:
            return forward(module, *args, **kwargs)
        driving_call = group.is_driver and not _serving
        if driving_call:
            _driver_in_forward = True  # stays set if the forward fails: see launch
            _send_call(group, args, kwargs)
        if _shard_weights and getattr(module, "sharded_blocks", None) is None:
            _cache.sharded_blocks += shard_weights(module, group)  # every rank, at its first forward of this model
        out = forward(module, *args, **kwargs)
        if driving_call:
            _driver_in_forward = False
        return out

    return wrapper


def serve(model: torch.nn.Module, group: ParallelGroup) -> int:
    """A follower's work: run every forward of ``model`` the driver sends, until it stops.
    Returns how many forwards ran."""
    global _serving
    if group.is_driver:
        raise SequenceParallelError("rank 0 drives the launch; it does not serve")
    count = 0
    _serving = True
    try:
        while True:
            message: list[Any] = [None]
            try:
                dist.broadcast_object_list(message, src=0, device=group.device)
            except RuntimeError as exc:  # rank 0 went away; its own error is the one to read
                raise SequenceParallelError(f"rank {group.rank}: rank 0 stopped without ending the launch "
                                            f"(see its error): {str(exc).splitlines()[0][:200]}") from None
            kind, *rest = message[0]
            if kind == _STOP:
                return count
            args, kwargs = _receive_call(group, *rest)
            with torch.no_grad():
                model(*args, **kwargs)
            count += 1
    finally:
        _serving = False
        _cache.received.clear()


@contextlib.contextmanager
def driving(group: ParallelGroup | None) -> Iterator[None]:
    """The driver's side of :func:`serve`: the followers stop when the block ends (also on an error
    between forwards, so they never wait for a forward that will not come). A no-op without a launch."""
    try:
        yield
    finally:
        if group is not None and group.is_driver:
            _cache.sent.clear()
            if not _driver_in_forward:  # else the followers are inside that forward: see launch
                dist.broadcast_object_list([(_STOP,)], src=0, device=group.device)


# -- weights --------------------------------------------------------------------------------------

#: ``KEYFRAME_WORLDS_SHARD_WEIGHTS``: ``1`` shards the transformer's blocks with FSDP2 in a launch
#: (:func:`shard_weights`), ``0`` (the default) keeps a whole copy on every rank.
SHARD_WEIGHTS_ENV = "KEYFRAME_WORLDS_SHARD_WEIGHTS"


def wants_sharded_weights(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    value = environ.get(SHARD_WEIGHTS_ENV, "0").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", ""):
        raise SequenceParallelError(f"{SHARD_WEIGHTS_ENV} must be 1 or 0, got {environ[SHARD_WEIGHTS_ENV]!r}")
    return value in ("1", "true", "yes")


def shard_weights(model: torch.nn.Module, group: ParallelGroup) -> int:
    """Shard every transformer block (backbone and control branch) over the ranks with FSDP2's
    ``fully_shard``: each rank keeps ``1/P`` of each block's weights and gathers a block's whole weights
    just before it runs (freeing them after). Embedders, the head and the norms outside blocks stay whole.
    Every rank must call this on the same model before its first forward. Returns how many blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if getattr(model, "block_streamer", None) is not None:
        raise SequenceParallelError(f"{SHARD_WEIGHTS_ENV}=1 and sequential offload both manage the blocks' weights: "
                                    "use one of them")
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    blocks = list(model.blocks) + list(getattr(getattr(model, "controlnet", None), "controlnet_blocks", []))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    model.sharded_blocks = len(blocks)
    return len(blocks)


def run_command(requested_device: str, drive: Callable[[ParallelGroup | None], int],
                load_model: Callable[[ParallelGroup], torch.nn.Module]) -> int:
    """A command under torchrun or alone: ``drive(group)`` on rank 0 (``group`` None when alone) is the
    command itself; every other rank builds the same transformer with ``load_model(group)`` and
    :func:`serve`\\ s it until the driver is done. Returns the command's exit status (0 on followers)."""
    with launch(requested_device) as group:
        if group is None:
            return drive(None)
        if group.is_driver:
            _cache.forwards = _cache.sharded_blocks = 0
            with driving(group):
                status = drive(group)
            sharded = f"; {_cache.sharded_blocks} blocks' weights sharded (FSDP2)" if _cache.sharded_blocks else ""
            print(f"keyframe-worlds: sequence-parallel over {group.world_size} processes ({group.backend}): "
                  f"{_cache.forwards} transformer forward(s) split across them{sharded}", file=sys.stderr)
            return status
        model = load_model(group)
        try:
            serve(model, group)
        except KeyframeWorldsError as exc:
            if isinstance(exc, SequenceParallelError):
                raise
            # a forward's own check failed: rank 0 ran the same forward and reports the same line
            raise SystemExit(2) from None
        return 0
