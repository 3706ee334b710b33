# shakedown: the two commands of the README, and the checks behind them.
CARGO ?= cargo

.PHONY: run test test-kube lint bench build clean

## make run: build shakedown and run the quick-start playbook on the local cluster.
## Through cargo, so it finds the binary wherever CARGO_TARGET_DIR puts it.
run:
	$(CARGO) run --release -- run playbooks/quickstart.yaml

## make test: formatting, lints, then every test (unit, integration, end to end).
test: lint
	.ci/install-test-tools
	$(CARGO) test --doc
	# Not --all-targets: that would run the benchmark too (`make bench`);
	# clippy above still builds it.
	$(CARGO) test --lib --bins --tests
	$(MAKE) test-kube

## make test-kube: the Kubernetes backend against a real control plane
## (../shared/k8s-real, or $$K8S_REAL), started fresh for each test. Without
## its binaries this says it skipped, and nothing is counted as passed.
K8S_REAL ?= $(abspath ../shared/k8s-real)
test-kube:
	@if [ -x "$(K8S_REAL)/bin/kube-apiserver" ] && command -v etcd >/dev/null; then \
		K8S_REAL="$(K8S_REAL)" $(CARGO) test --test kubernetes_real -- --ignored --test-threads=1; \
	else \
		echo "SKIPPED tests/kubernetes_real.rs: no control plane binaries in $(K8S_REAL)/bin (or no etcd);"; \
		echo "        build them once as $(K8S_REAL)/README.md says, or set K8S_REAL. Not counted as passed."; \
	fi

## make bench: the load generator's speed and memory, and summarising 1,000,000 records.
bench:
	$(CARGO) bench --bench load

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

build:
	$(CARGO) build --release

clean:
	$(CARGO) clean
