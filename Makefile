# Keyframe Worlds: set-up, tests, demo and the Blender extension.
# Every target that needs Python first makes .venv and installs the project into it;
# the install re-runs only when pyproject.toml changes (a second run installs nothing).

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BLENDER_EXT = $(VPY) $(VENV)/lib/python3.11/site-packages/bpy/5.0/scripts/addons_core/bl_pkg/cli/blender_ext.py
PYTEST_ARGS ?=
DIST ?= dist

.PHONY: setup test demo extension bench clean

setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --disable-pip-version-check -q -e ".[engine,blender,test]"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VPY) scripts/demo.py --out demo_out

# The zip is built from the files git tracks only (staged in build/), so whatever else lies in the
# checkout (a sparse/ model, job folders, a .blend from the README's examples) never ends up in it.
EXT_SRC := build/extension-source
extension: setup
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "make extension: needs a git checkout (it packs the tracked files)"; exit 1; }
	rm -rf $(EXT_SRC)
	mkdir -p $(EXT_SRC) $(DIST)
	git ls-files -z | tar --null -T - -cf - | tar -xf - -C $(EXT_SRC)
	$(BLENDER_EXT) build --source-dir $(EXT_SRC) --output-dir $(DIST)
	$(BLENDER_EXT) validate $(DIST)/keyframe_worlds-*.zip

bench: setup
	$(VPY) -m pip install --disable-pip-version-check -q -e ".[engine,blender,test,bench]"
	@for b in bench/*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf dist build demo_out .pytest_cache .hypothesis
