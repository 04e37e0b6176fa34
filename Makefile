# criserver: set-up, build and test entry points (see README.md).
#   sudo make run    install everything a fresh Debian bookworm host needs, then run the daemon
#   sudo make test   install the same, then lint and run the whole test suite
SHELL := /bin/bash
# Go as Debian-free machines have it (go.dev's tarball in /usr/local/go).
export PATH := $(PATH):/usr/local/go/bin
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Debian packages: QEMU and the guest's kernel/userland (qemu-system-x86, linux-image-*,
# busybox-static, crun and runc (the guest's OCI runtimes), python3, erofs-utils, cpio, lz4; gcc, libc6-dev and libseccomp-dev
# build the agent's static exec helper guest/vmexec.c), pod networking
# (containernetworking-plugins, iproute2, iptables), and the tests' registry and tools
# (docker-registry, skopeo, apache2-utils for htpasswd, socat; make, dpkg-dev, bzip2 and xz-utils
# build busybox from its Debian source for the conformance images; syslinux, mtools and
# dosfstools make the machine tests' bootable OS disk without mounting anything).
APT_PACKAGES := qemu-system-x86 qemu-utils linux-image-amd64 linux-image-cloud-amd64 \
	busybox-static crun runc python3 python3-venv erofs-utils squashfs-tools cpio lz4 zstd \
	ca-certificates \
	gcc libc6-dev libseccomp-dev make dpkg-dev bzip2 xz-utils \
	containernetworking-plugins iproute2 iptables docker-registry skopeo apache2-utils socat \
	syslinux syslinux-common mtools dosfstools

.PHONY: install install-service deps venv proto guest run test lint typecheck bench bench-machines clean tools conformance-assets

# The real CRI clients, built from their Go modules through the Go module proxy into a
# git-ignored directory named by version (a new version builds afresh; nothing is committed).
# Go's module and build caches live under .cache/go so a CI machine keeps them between runs.
CRI_TOOLS_VERSION := v1.37.0
TOOLS_DIR := .tools/cri-tools-$(CRI_TOOLS_VERSION)
GO_ENV := GOMODCACHE=$(CURDIR)/.cache/go/mod GOCACHE=$(CURDIR)/.cache/go/build \
	GOFLAGS=-modcacherw CGO_ENABLED=0 GOTOOLCHAIN=local
# The version the tools print (upstream fills it in at link time, as here).
CRI_TOOLS_LDFLAGS := -X sigs.k8s.io/cri-tools/pkg/version.Version=$(CRI_TOOLS_VERSION)
CRI_TOOLS_SRC = $(shell $(GO_ENV) go mod download -json sigs.k8s.io/cri-tools@$(CRI_TOOLS_VERSION) \
	| sed -n 's/^\t"Dir": "\(.*\)",$$/\1/p')

install: deps venv guest ctrmon
	ln -sf $(CURDIR)/$(VENV)/bin/criserver /usr/local/bin/criserver

# The runc backend's per-container monitor (criserver/backends/runc/ctrmon.c): static, installed
# where the daemon looks for it (/usr/local/lib/criserver/ctrmon, monitor.DEFAULT_CTRMON).
.PHONY: ctrmon
ctrmon: venv
	$(PY) -m criserver.backends.runc.build

deps:
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(APT_PACKAGES) 2>/dev/null \
		| awk '$$NF != "installed" {print $$1}'; \
		for p in $(APT_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

proto: venv
	bash proto/generate.sh

guest: venv
	$(PY) -m guest.build

tools: $(TOOLS_DIR)/crictl $(TOOLS_DIR)/critest

$(TOOLS_DIR)/crictl:
	mkdir -p $(TOOLS_DIR)
	$(GO_ENV) GOBIN=$(CURDIR)/$(TOOLS_DIR) go install -ldflags '$(CRI_TOOLS_LDFLAGS)' \
		sigs.k8s.io/cri-tools/cmd/crictl@$(CRI_TOOLS_VERSION)

# critest is a ginkgo test binary, not a main package: compile its test in the module itself.
$(TOOLS_DIR)/critest:
	mkdir -p $(TOOLS_DIR)
	cd $(CRI_TOOLS_SRC) && $(GO_ENV) go test -c -ldflags '$(CRI_TOOLS_LDFLAGS)' \
		-o $(CURDIR)/$@ ./cmd/critest

# What the images critest and crictl pull are made of (tests/conformance/images.py): a full
# static busybox from Debian's source package, Debian's nginx with its libraries, pause, nnp.
# The script skips what .cache/conformance already holds.
conformance-assets:
	tests/conformance/build-assets.sh .cache/conformance

# kubelet for the standalone-node tests (tests/kubelet/), built as the CRI tools are. It cannot
# be `go install`ed (k8s.io/kubernetes replaces its staging modules with its own directories):
# tools/kubelet/go.mod requires it and pins each staging module to its served version; the
# version is read there. From an empty build cache: 445 s of CPU (6.5 min on 2 busy cores),
# 1.6 GB of RAM at most (the link), 2 GB of build cache. make test builds it: the standalone
# node tests (tests/kubelet/) run in CI.
KUBELET_VERSION := $(shell sed -n 's/^\tk8s.io\/kubernetes \(v[^ ]*\).*/\1/p' tools/kubelet/go.mod)
KUBELET := .tools/kubelet-$(KUBELET_VERSION)/kubelet
KUBELET_SEMVER = $(subst ., ,$(KUBELET_VERSION:v%=%))
KUBELET_LDFLAGS = -s -w -X k8s.io/component-base/version.gitVersion=$(KUBELET_VERSION) \
	-X k8s.io/component-base/version.gitMajor=$(word 1,$(KUBELET_SEMVER)) \
	-X k8s.io/component-base/version.gitMinor=$(word 2,$(KUBELET_SEMVER)) \
	-X k8s.io/component-base/version.gitTreeState=clean

.PHONY: kubelet kubelet-node
kubelet: $(KUBELET)

$(KUBELET): tools/kubelet/go.mod tools/kubelet/go.sum
	mkdir -p $(dir $@)
	cd tools/kubelet && $(GO_ENV) go build -ldflags '$(KUBELET_LDFLAGS)' -o $(CURDIR)/$@ \
		k8s.io/kubernetes/cmd/kubelet

# irictl-machine, IronCore's MachineRuntime client, for tests/machine/test_irictl.py: built as
# the kubelet is, from tools/irictl/go.mod (which pins github.com/ironcore-dev/ironcore; the
# version is read there). From an empty build cache at nice 10 on 2 busy cores: 3.9 min
# (203 s of CPU), 0.8 GB of RAM at most, 1 GB of build cache. make test builds it.
IRICTL_VERSION := $(shell sed -n 's/^\tgithub.com\/ironcore-dev\/ironcore \(v[^ ]*\).*/\1/p' tools/irictl/go.mod)
IRICTL := .tools/irictl-$(IRICTL_VERSION)/irictl-machine

.PHONY: irictl
irictl: $(IRICTL)

$(IRICTL): tools/irictl/go.mod tools/irictl/go.sum
	mkdir -p $(dir $@)
	cd tools/irictl && $(GO_ENV) go build -ldflags '-s -w' -o $(CURDIR)/$@ \
		github.com/ironcore-dev/ironcore/irictl-machine/cmd/irictl-machine

# The standalone node the kubelet tests use, up until Ctrl-C (it takes the VM lock).
kubelet-node: install kubelet conformance-assets
	$(PY) -m tests.kubelet.node

run: install
	$(VENV)/bin/criserver serve

lint: venv
	$(VENV)/bin/ruff check criserver vmagent guest tests bench

typecheck: venv
	$(VENV)/bin/mypy criserver vmagent guest/build.py

test: install tools kubelet irictl conformance-assets lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

# The parsers' fuzz targets (tests/fuzz/), FUZZ_SECONDS each, at low priority; new inputs go to
# a scratch directory, crashes to .cache/fuzz. The unit suite runs each for a few seconds.
FUZZ_SECONDS ?= 300
.PHONY: fuzz
fuzz: venv
	mkdir -p .cache/fuzz
	set -o pipefail; for t in $$($(PY) -m tests.fuzz.run --list 2>/dev/null); do \
		mkdir -p .cache/fuzz/$$t && echo "fuzzing $$t for $(FUZZ_SECONDS)s" && \
		nice -n 15 $(PY) -m tests.fuzz.run $$t -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=.cache/fuzz/ .cache/fuzz/$$t tests/fuzz/corpus/$$t \
			2>&1 | grep -v '^INFO: Instrumenting' | tail -n 3 || exit 1; \
	done

# containerd is the same-run baseline of bench/exec_baseline.py, crictl_ops.py and density.py
# (no daemon of it is started). The issue 16 benches boot VMs: under the VM lock. crictl_ops is
# the per-call yardstick (with the default warm pool, then every pod a fresh clone),
# lifecycle_breakdown where the time goes, density the 110-pod run.
bench: install tools
	$(MAKE) deps APT_PACKAGES=containerd
	$(PY) bench/cri_latency.py
	flock /tmp/criserver-vm.lock $(PY) -m bench.crictl_ops
	flock /tmp/criserver-vm.lock $(PY) -m bench.crictl_ops --warm-pool 0
	flock /tmp/criserver-vm.lock $(PY) bench/lifecycle_breakdown.py
	flock /tmp/criserver-vm.lock $(PY) -m bench.translation
	flock /tmp/criserver-vm.lock $(PY) bench/density.py

# IRI machines against the same VM started on the VM layer (docs/benchmarks.md, issue 17)
bench-machines: install
	$(PY) bench/machines.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache

# Install the systemd unit (after `make install`); then: systemctl enable --now criserver
install-service: install
	install -m 0644 systemd/criserver.service /etc/systemd/system/criserver.service
	systemctl daemon-reload
