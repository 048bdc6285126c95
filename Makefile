# Sluice developer commands. `make verify` is the read-only gate CI runs unchanged;
# `make fix` is its mutating twin.
.PHONY: help verify tools control-plane fix fmt-check clippy test foreign crds local bench

CARGO ?= cargo

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

verify: ## the CI gate: tools, control plane, formatting, lints, all tests, the foreign client (read-only)
	@for stage in tools control-plane fmt-check clippy test foreign; do \
	  start=$$(date +%s); \
	  $(MAKE) --no-print-directory $$stage || exit 1; \
	  echo "== make $$stage took $$(( $$(date +%s) - start )) s"; \
	done

tools: ## install helm, kubectl, kubernetes-validate and Python grpcio if missing (idempotent)
	.ci/install-tools

control-plane: ## build (once, then cached) the test Kubernetes control plane from its Go modules
	tests/control-plane/build >/dev/null

fmt-check: ## rustfmt in check mode
	$(CARGO) fmt --all -- --check

clippy: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: ## every test of the workspace; tests needing helm/kubernetes-validate fail if they are missing
	SLUICE_REQUIRE_TOOLS=1 $(CARGO) test --workspace --locked

foreign: ## the public API from Python grpcio, stubs generated from the .proto alone
	$(CARGO) build --locked -p sluice-agent
	python3 -m pytest -q tests/foreign

fix: ## format, apply clippy fixes, regenerate crds/
	$(CARGO) fmt --all
	$(CARGO) clippy --workspace --all-targets --fix --allow-dirty --allow-staged
	$(MAKE) crds

crds: ## regenerate crds/ from the Rust types, and the chart's copy
	$(CARGO) run --quiet -p sluice-operator --bin crdgen > crds/messagequeue.yaml
	cp crds/messagequeue.yaml charts/sluice/crds/messagequeue.yaml

local: ## run Sluice on this machine (same as the README's run command)
	$(CARGO) build --release -p sluice -p sluice-agent && target/release/sluice local

bench: ## benchmark Sluice against peers (see bench/README.md)
	$(CARGO) build --release -p sluice-agent -p sluice-bench
	target/release/sluice-bench
