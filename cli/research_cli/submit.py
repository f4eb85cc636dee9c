"""``submit``: a ResearchJob from flags, and a documents folder as a ConfigMap it owns.

The builders are pure (tests call them without a cluster); ``apply`` creates the objects in the
order that never leaves a worker without its documents: the ConfigMap first, then the
ResearchJob, then the ConfigMap's ownerReference to it (so deleting the ResearchJob deletes its
documents). A ResearchJob that cannot be created takes its new ConfigMap with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from research_api.estimate import estimate
from research_api.modelendpoint import ENDPOINT_PLURAL, ModelEndpointSpec, Prices
from research_api.names import CONFIGMAP_DATA_LIMIT, LABEL_JOB, label_value
from research_api.researchjob import GROUP, KIND, PLURAL, VERSION, EstimateStatus, ResearchJobSpec, SourceType
from research_cli.errors import CliError, UsageError
from research_cli.kube import CRD, Kube, is_missing_api, server_message
from research_cli.output import table

KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")  # a valid ConfigMap data key
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubectl-research"}
DOCUMENTS_SUFFIX = "-documents"


@dataclass(frozen=True)
class Corpus:
    folder: Path
    data: dict[str, str]

    @property
    def size(self) -> int:
        """Bytes as the API server counts them against the ConfigMap limit (keys and values)."""
        return sum(len(k.encode()) + len(v.encode()) for k, v in self.data.items())


def read_corpus(folder: Path) -> Corpus:
    """One document per regular file (like ``kubectl create configmap --from-file=DIR``); hidden files
    and sub-folders are skipped. Refuses an empty folder, a binary file and a corpus too big for
    one ConfigMap, saying which and by how much."""
    if not folder.exists():
        raise CliError(f"documents folder {folder} does not exist")
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder: --documents takes a folder of text or Markdown files")
    data: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if not KEY_RE.match(path.name):
            raise CliError(f"{path}: a document's file name may only hold letters, digits, '-', '_' and '.'")
        try:
            data[path.name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CliError(f"{path} is not UTF-8 text: documents must be text or Markdown files") from None
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if not data or not any(v.strip() for v in data.values()):
        raise CliError(f"no documents in {folder}: it holds no non-empty files (hidden files are skipped)")
    corpus = Corpus(folder, data)
    if corpus.size > CONFIGMAP_DATA_LIMIT:
        raise CliError(
            f"the documents in {folder} are {corpus.size} bytes ({corpus.size / 2**20:.2f} MiB) in {len(data)} files, "
            f"more than the {CONFIGMAP_DATA_LIMIT} bytes (1 MiB) a ConfigMap can hold; split them into several "
            "folders, create a ConfigMap for each and name them with --documents-configmap"
        )
    return corpus


def documents_configmap_name(job: str) -> str:
    return f"{job}{DOCUMENTS_SUFFIX}"


def corpus_configmap(job: str, namespace: str, corpus: Corpus) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": documents_configmap_name(job),
            "namespace": namespace,
            "labels": {LABEL_JOB: label_value(job), **MANAGED_BY},
        },
        "data": dict(corpus.data),
    }


def _secret_ref(value: str, flag: str, default_key: str) -> dict[str, str]:
    name, _, key = value.partition(":")
    if not name:
        raise UsageError(f"{flag} wants SECRET[:KEY], got {value!r}")
    return {"name": name, "key": key or default_key}


def researchjob_manifest(name: str, namespace: str, args: Any) -> dict[str, Any]:
    """The ResearchJob the flags describe, checked against the API types before it is sent."""
    sources: list[dict[str, Any]] = []
    if args.documents:
        sources.append({"type": "documents", "configMap": documents_configmap_name(name)})
    for cm in args.documents_configmap or []:
        sources.append({"type": "documents", "configMap": cm})
    if args.wikipedia:
        sources.append({"type": "wikipedia"})
    if args.tavily:
        sources.append({"type": "tavily", "apiKeySecretRef": _secret_ref(args.tavily, "--tavily", "api-key")})
    if not sources:
        raise UsageError("no source: give --documents DIR, --documents-configmap NAME, --wikipedia or --tavily SECRET")
    if args.max_results is not None:
        for s in sources:
            s["maxResults"] = args.max_results
    spec: dict[str, Any] = {
        "topic": args.topic,
        "analysts": {"count": args.analysts, **({"review": True} if args.review else {})},
        "sources": sources,
        "parallelism": {"batchSize": args.batch_size, "maxActiveJobs": args.max_active_jobs},
    }
    if args.max_turns is not None:
        spec["interview"] = {"maxTurns": args.max_turns}
    model: dict[str, Any] = {}
    if args.model:
        model["name"] = args.model
    if args.base_url:
        model["baseUrl"] = args.base_url
    if args.api_key_secret:
        model["apiKeySecretRef"] = _secret_ref(args.api_key_secret, "--api-key-secret", "api-key")
    if getattr(args, "endpoint", None):
        model["endpoint"] = args.endpoint
    if model:
        spec["model"] = model
    budget = {
        k: v
        for k, v in (
            ("maxTokens", args.max_tokens),
            ("maxCost", getattr(args, "max_cost", None)),
            ("deadlineSeconds", args.deadline),
            ("maxEstimatedTokens", getattr(args, "max_estimated_tokens", None)),
            ("maxEstimatedCost", getattr(args, "max_estimated_cost", None)),
        )
        if v is not None
    }
    if budget:
        spec["budget"] = budget
    floor = (("minCitationAccuracy", args.min_citation_accuracy), ("minCoverage", args.min_coverage))
    quality = {k: v for k, v in floor if v is not None}
    if quality:
        spec["quality"] = quality
    if args.postgres_dsn_secret:
        spec["store"] = {"type": "postgres", "dsnSecretRef": _secret_ref(args.postgres_dsn_secret, "--postgres", "dsn")}
    if args.ttl is not None:
        spec["ttlSecondsAfterFinished"] = args.ttl
    try:
        ResearchJobSpec.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise UsageError(f"invalid ResearchJob: {problems}") from None
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def owner_reference(rj: dict[str, Any]) -> dict[str, Any]:
    """Owned, not controlled: the garbage collector deletes the documents with the ResearchJob."""
    meta = rj["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"], "uid": meta["uid"]}


def apply(kube: Kube, rj: dict[str, Any], cm: dict[str, Any] | None, dry_run: str) -> list[dict[str, Any]]:
    """Create the objects (``dry_run``: ``none`` or ``server``); returns them as the server answered."""
    ns, name = rj["metadata"]["namespace"], rj["metadata"]["name"]
    dry = {"dry_run": "All"} if dry_run == "server" else {}
    try:
        kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, _request_timeout=(5, 30))
        raise CliError(f'researchjob "{name}" already exists in namespace "{ns}"')
    except ApiException as exc:
        if exc.status == 404 and is_missing_api(exc):
            raise CliError(f"the ResearchJob API ({CRD}) is not installed in this cluster") from None
        if exc.status != 404:
            raise CliError(f"cannot get researchjob {ns}/{name}: {server_message(exc)}") from None
    except CliError:
        raise
    except Exception:  # noqa: BLE001 - connection problems: let the create below report them
        pass
    made: list[dict[str, Any]] = []
    if cm is not None:
        try:
            created_cm = kube.call(
                f"create configmap {ns}/{cm['metadata']['name']}",
                kube.core.create_namespaced_config_map,
                ns,
                cm,
                **dry,
            )
        except CliError as exc:
            if "already exists" in str(exc):
                raise CliError(
                    f'configmap "{cm["metadata"]["name"]}" already exists in namespace "{ns}" (left by an earlier '
                    "submit?); delete it or choose another ResearchJob name"
                ) from None
            raise
        made.append(kube.plain(created_cm))
    try:
        created = kube.call(
            f"create researchjob {ns}/{name}",
            kube.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            PLURAL,
            rj,
            **dry,
        )
    except CliError:
        if cm is not None and not dry:
            _delete_quietly(kube, ns, cm["metadata"]["name"])
        raise
    made.insert(0, cast(dict[str, Any], created))
    if cm is not None and not dry:
        patch = {"metadata": {"ownerReferences": [owner_reference(made[0])]}}
        kube.call(
            f"set the owner of configmap {ns}/{cm['metadata']['name']}",
            kube.core.patch_namespaced_config_map,
            cm["metadata"]["name"],
            ns,
            patch,
        )
    return made


def _delete_quietly(kube: Kube, namespace: str, name: str) -> None:
    try:
        kube.core.delete_namespaced_config_map(name, namespace, _request_timeout=(5, 30))
    except Exception:  # noqa: BLE001 - best effort; the create error is what the user needs to see
        pass


@dataclass(frozen=True)
class Estimate:
    """``submit --estimate``: the figures, and where the prices come from or why the cost is unknown."""

    figures: EstimateStatus
    cost_basis: str  # "ModelEndpoint NAME: 2.50 in, 10 out per million tokens", or why the cost is unknown


def endpoint_prices(kube: Kube | None, name: str | None, offline: str = "") -> tuple[Prices | None, str]:
    """The prices of ModelEndpoint ``name`` if the caller may read it: (prices, where they come from),
    or (None, why the cost is unknown). ``kube`` None: no cluster (``offline`` says why)."""
    if not name:
        return None, "cost unknown: the job names no ModelEndpoint (--endpoint NAME), whose spec.prices it needs"
    if kube is None:
        return None, f'cost unknown: ModelEndpoint "{name}" cannot be read without a cluster ({offline})'
    try:
        obj = kube.custom.get_cluster_custom_object(GROUP, VERSION, ENDPOINT_PLURAL, name, _request_timeout=(5, 30))
    except ApiException as exc:
        if exc.status == 404:
            return None, f'cost unknown: ModelEndpoint "{name}" does not exist'
        if exc.status == 403:
            return None, f'cost unknown: you may not get ModelEndpoint "{name}" ({server_message(exc)})'
        return None, f'cost unknown: cannot get ModelEndpoint "{name}": {server_message(exc)}'
    except Exception as exc:  # noqa: BLE001 - connection problems: the tokens are still worth printing
        return None, f'cost unknown: cannot get ModelEndpoint "{name}": {type(exc).__name__}'
    try:
        spec = ModelEndpointSpec.model_validate(cast(dict[str, Any], obj or {}).get("spec") or {})
    except ValidationError:
        return None, f'cost unknown: ModelEndpoint "{name}" has an invalid spec'
    if spec.prices is None:
        return None, f'cost unknown: ModelEndpoint "{name}" has no prices (spec.prices)'
    p = spec.prices
    return p, f"ModelEndpoint {name}: {p.input_per_million} in, {p.output_per_million} out per million tokens"


def estimate_of(kube: Kube | None, rj: dict[str, Any], corpus: Corpus | None, offline: str = "") -> Estimate:
    """The estimate of the ResearchJob ``rj`` (research_api.estimate, as the operator computes it): over
    the local ``corpus`` (``--documents``) and every ``--documents-configmap`` (read through the API),
    at its ModelEndpoint's prices. Creates nothing. ``kube`` None: no cluster (``offline`` says why)."""
    spec = ResearchJobSpec.model_validate(rj["spec"])
    ns = rj["metadata"]["namespace"]
    local = documents_configmap_name(rj["metadata"]["name"])
    documents: dict[str, str] | None = None
    for s in spec.sources:
        if s.type != SourceType.documents or s.config_map is None:
            continue
        if s.config_map == local and corpus is not None:
            data = corpus.data
        elif kube is None:
            raise CliError(f"--documents-configmap {s.config_map}: the estimate needs to read it: {offline}")
        else:
            cm = kube.call(f"get configmap {ns}/{s.config_map}", kube.core.read_namespaced_config_map, s.config_map, ns)
            data = dict(cm.data or {})
        documents = {**(documents or {}), **data}
    prices, where = endpoint_prices(kube, spec.model.endpoint, offline)
    return Estimate(estimate(spec, documents, prices), where)


def estimate_table(name: str, e: Estimate) -> str:
    """The estimate as a table per step, with where the cost comes from and what it was computed from."""
    f = e.figures
    rows: list[list[Any]] = [
        [s.step, s.calls, s.input_tokens, s.output_tokens, s.input_tokens + s.output_tokens] for s in f.steps or []
    ]
    rows.append(["total", f.calls, f.input_tokens, f.output_tokens, f.tokens])
    cost = f"cost: {f.cost} ({e.cost_basis})" if f.cost is not None else e.cost_basis
    return (
        f"estimate of {KIND.lower()}/{name} (nothing was created)\n"
        + table(["STEP", "CALLS", "PROMPT", "COMPLETION", "TOKENS"], rows)
        + f"{cost}\nbasis: {f.basis}\n"
    )
