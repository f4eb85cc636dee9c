"""kubectl research: submit, follow and read ResearchJobs; see and set what admins control.

Installed as ``kubectl-research`` on PATH, so kubectl runs it as ``kubectl research ...``. Flags
follow kubectl: ``-n/--namespace``, ``-A/--all-namespaces``, ``--context``, ``--kubeconfig``,
``-o``; every command has ``--help``. Errors are one line on stderr. Exit codes: 0 done,
1 the request failed (unknown object, API error, a followed ResearchJob failed or timed out),
2 bad flags or arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from research_api.apimodel import MONEY_PATTERN
from research_api.researchjob import GROUP, MAX_ACTIVE_JOBS, MAX_ANALYSTS, MAX_BATCH_SIZE, PLURAL, VERSION
from research_cli import admin, logs, progress, report, submit
from research_cli.errors import EXIT_ERROR, EXIT_OK, CliError, UsageError
from research_cli.kube import Kube, connect
from research_cli.output import dump, dump_list, table

PROG = "kubectl research"
RESOURCE = f"researchjob.{GROUP}"

EXAMPLES = """examples:
  kubectl research submit fair-sharing --topic "Fair sharing of GPUs between teams" \\
      --documents examples/corpus/ --analysts 4 --batch-size 2 --wait
  kubectl research watch fair-sharing
  kubectl research report fair-sharing -o html --output report.html
  kubectl research top -A
  kubectl research caps set globalMaxActiveJobs=10
"""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other error here."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    d: Any = None if top else argparse.SUPPRESS
    g = p.add_argument_group("kubectl flags")
    g.add_argument("-n", "--namespace", default=d, help="namespace (default: the context's, else default)")
    g.add_argument("--context", default=d, help="kubeconfig context to use")
    g.add_argument("--kubeconfig", default=d, help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the ResearchJob")


def _money(text: str) -> str:
    """An amount of money as the API takes it: a decimal string such as 5.00."""
    if not re.fullmatch(MONEY_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not an amount of money: {text!r} (a decimal such as 5.00)")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def build_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description or help)
        _common(c, top=False)
        return c

    s = command(
        "submit",
        "create a ResearchJob from flags (and a documents folder as a ConfigMap it owns)",
        "Create a ResearchJob. --documents DIR becomes the ConfigMap NAME-documents (one document per file, "
        "at most 1 MiB in all), owned by the ResearchJob so it goes when the ResearchJob is deleted.",
    )
    _name(s)
    s.add_argument("--topic", required=True, help="the research topic (3-2000 characters)")
    s.add_argument("--analysts", type=_positive, default=3, help=f"analyst personas to plan (1-{MAX_ANALYSTS}, 3)")
    s.add_argument("--batch-size", type=_positive, default=2, help=f"analysts per worker Job (1-{MAX_BATCH_SIZE}, 2)")
    s.add_argument("--max-active-jobs", type=_positive, default=2, help=f"worker Jobs at once (1-{MAX_ACTIVE_JOBS}, 2)")
    s.add_argument("--max-turns", type=_positive, help="expert answers per interview (1-10, default 2)")
    src = s.add_argument_group("sources (at least one)")
    src.add_argument("--documents", type=Path, metavar="DIR", help="a folder of text/Markdown documents")
    src.add_argument(
        "--documents-configmap", action="append", metavar="NAME", help="an existing documents ConfigMap (repeatable)"
    )
    src.add_argument("--wikipedia", action="store_true", help="search Wikipedia (pods need internet access)")
    src.add_argument("--tavily", metavar="SECRET[:KEY]", help="search with Tavily, its key in this Secret (api-key)")
    src.add_argument("--max-results", type=_positive, help="search results per query for every source (1-20)")
    m = s.add_argument_group("model, budget and store")
    m.add_argument("--model", help="model name sent to the endpoint")
    m.add_argument("--base-url", help="OpenAI-compatible base URL ending in /v1 (default: the operator's)")
    m.add_argument("--api-key-secret", metavar="SECRET[:KEY]", help="Secret key holding the model API key (api-key)")
    m.add_argument("--max-tokens", type=_positive, help="token budget of the whole job (at least 1000)")
    m.add_argument(
        "--max-cost",
        type=_money,
        metavar="AMOUNT",
        help="money budget of the whole job at its ModelEndpoint's prices, e.g. 5.00",
    )
    m.add_argument("--deadline", type=_positive, metavar="SECONDS", help="fail when not finished in time (>= 60)")
    m.add_argument("--endpoint", metavar="NAME", help="a ModelEndpoint the admins declared (its URL, key and prices)")
    m.add_argument(
        "--max-estimated-tokens",
        type=_positive,
        metavar="N",
        help="do not start while the estimate is above N tokens (the operator holds it in Pending)",
    )
    m.add_argument(
        "--max-estimated-cost",
        type=_money,
        metavar="AMOUNT",
        help="do not start while the estimated cost at the ModelEndpoint's prices is above AMOUNT",
    )
    m.add_argument(
        "--min-citation-accuracy",
        type=int,
        metavar="PERCENT",
        help="quality floor: percent of cited sentences the passage they cite must support (0-100)",
    )
    m.add_argument(
        "--min-coverage",
        type=int,
        metavar="PERCENT",
        help="quality floor: percent of the documents relevant to the topic the report must cite (0-100)",
    )
    m.add_argument("--postgres", dest="postgres_dsn_secret", metavar="SECRET[:KEY]", help="postgres store (dsn)")
    m.add_argument("--review", action="store_true", help="wait for approval of the analysts (kubectl research approve)")
    m.add_argument("--ttl", type=_nonnegative, metavar="SECONDS", help="delete it this long after it finished")
    s.add_argument(
        "--dry-run",
        choices=["none", "client", "server"],
        default="none",
        nargs="?",
        const="client",
        help="client: print what would be sent; server: let the API server validate it, nothing is stored",
    )
    s.add_argument("-o", "--output", choices=["yaml", "json", "name"], help="print the objects")
    s.add_argument("--wait", action="store_true", help="then follow it like `watch` until it ends")
    s.add_argument(
        "--estimate",
        action="store_true",
        help="print the model calls, tokens and cost the job is estimated to spend; create nothing (-o json|yaml)",
    )

    w = command(
        "watch",
        "follow a ResearchJob until it ends",
        "Phase, sections done, worker batches running and queued (and why they wait), tokens against the budget "
        "and elapsed time. On a terminal the view updates in place; otherwise one line per change. Exits 0 when "
        "the ResearchJob succeeds, 1 when it fails or --timeout passes.",
    )
    _name(w)
    w.add_argument("--interval", type=float, default=1.0, help="seconds between reads (default 1)")
    w.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0 = never)")

    a = command("analysts", "show the planned analyst panel")
    _name(a)
    a.add_argument("-o", "--output", choices=["wide", "yaml", "json"], help="wide adds each analyst's focus")

    ap = command("approve", "approve the planned analysts of a ResearchJob waiting for review")
    _name(ap)

    f = command(
        "feedback",
        "ask for another analyst panel",
        "Set spec.analysts.feedback: the panel is planned again with it (under a new plan id), then waits "
        "for review again.",
    )
    _name(f)
    f.add_argument("text", metavar="TEXT", help='e.g. "Add an analyst focused on GPU cost"')
    f.add_argument("--force", action="store_true", help="also when past review (its sections are discarded)")

    r = command("report", "print the finished report (ConfigMap or PostgreSQL store)")
    _name(r)
    r.add_argument("-o", "--format", choices=["md", "html"], default="md", help="md (Markdown, default) or html")
    r.add_argument("--output", dest="file", metavar="FILE", help="write it to FILE instead of stdout")
    r.add_argument(
        "--dsn-env", metavar="VAR", help="postgres store: the variable holding the DSN (default: its Secret)"
    )

    lg = command("logs", "print the logs of a ResearchJob's worker pods")
    _name(lg)
    lg.add_argument("--analyst", type=_nonnegative, metavar="N", help="only the interview pod of analyst N (0-based)")
    lg.add_argument("--step", choices=["plan", "interview", "write"], help="only pods of this step")
    lg.add_argument("--tail", type=int, metavar="LINES", help="last LINES lines of each log")

    t = command(
        "top",
        "worker Jobs running and queued, caps, quota headroom and what waits (admins)",
        "Per namespace (-n, default the context's; -A for all) and cluster-wide: worker Jobs running and "
        "queued, the caps in force (the operator's settings ConfigMap), each ResourceQuota's headroom in worker "
        "pods, and what every waiting ResearchJob waits for.",
    )
    t.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    t.add_argument("-o", "--output", choices=["wide", "yaml", "json"], help="print the view as YAML or JSON")
    _settings_flags(t)

    c = command(
        "caps",
        "show or set the operator's caps on running worker Jobs (admins)",
        "caps: show them. caps set KEY=VALUE ...: set them in the settings ConfigMap the operator watches "
        f"(keys: {', '.join(admin.CAPS)}; whole numbers, 0 = unlimited); the operator applies them on its next "
        "reconcile. Every value is checked before anything is written.",
    )
    c.add_argument("action", nargs="?", choices=["show", "set"], default="show")
    c.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    c.add_argument("-o", "--output", choices=["yaml", "json"], help="print the caps as YAML or JSON")
    _settings_flags(c)
    return p


def _settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operator-namespace", help="where the operator runs (default: found by the settings label)")
    p.add_argument("--settings-configmap", help=f"its settings ConfigMap (default {admin.DEFAULT_SETTINGS_CONFIGMAP})")


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_submit(kube: Kube, args: argparse.Namespace) -> int:
    ns = kube.namespace
    rj = submit.researchjob_manifest(args.name, ns, args)
    cm = submit.corpus_configmap(args.name, ns, submit.read_corpus(args.documents)) if args.documents else None
    if args.dry_run == "client":
        objs = [rj, *([cm] if cm else [])]
        if args.output in ("yaml", "json"):
            _write(dump_list(objs, args.output) if len(objs) > 1 else dump(rj, args.output))
        else:
            _write(f"{RESOURCE}/{args.name} created (dry run)\n")
            if cm:
                _write(f"configmap/{cm['metadata']['name']} created (dry run)\n")
        return EXIT_OK
    made = submit.apply(kube, rj, cm, args.dry_run)
    suffix = " (server dry run)" if args.dry_run == "server" else ""
    if args.output in ("yaml", "json"):
        _write(dump_list(made, args.output) if len(made) > 1 else dump(made[0], args.output))
    elif args.output == "name":
        _write(f"{RESOURCE}/{args.name}\n" + (f"configmap/{cm['metadata']['name']}\n" if cm else ""))
    else:
        _write(f"{RESOURCE}/{args.name} created{suffix}\n")
        if cm:
            corpus = submit.Corpus(args.documents, cm["data"])
            _write(
                f"configmap/{cm['metadata']['name']} created{suffix}: {len(corpus.data)} documents, "
                f"{corpus.size} bytes, owned by {RESOURCE}/{args.name}\n"
            )
    if args.wait and args.dry_run == "none":
        return follow(kube, ns, args.name, interval=1.0, timeout=0)
    return EXIT_OK


def cmd_estimate(kube: Kube | None, args: argparse.Namespace, offline: str = "") -> int:
    """``submit --estimate``: the figures, nothing created. Without a cluster (``kube`` None, ``offline``
    says why) only the local --documents are read and the cost is unknown."""
    if args.wait or args.dry_run != "none" or args.output == "name":
        raise UsageError("--estimate creates nothing: it takes no --wait, --dry-run or -o name")
    ns = kube.namespace if kube is not None else args.namespace or "default"
    rj = submit.researchjob_manifest(args.name, ns, args)
    corpus = submit.read_corpus(args.documents) if args.documents else None
    est = submit.estimate_of(kube, rj, corpus, offline)
    if args.output in ("yaml", "json"):
        _write(
            dump({"researchJob": f"{ns}/{args.name}", **est.figures.wire(), "costBasis": est.cost_basis}, args.output)
        )
    else:
        _write(submit.estimate_table(args.name, est))
    return EXIT_OK


def follow(kube: Kube, ns: str, name: str, interval: float, timeout: float) -> int:
    """Print progress until the ResearchJob ends: in place on a terminal, else a line per change."""
    tty = sys.stdout.isatty()
    start = time.monotonic()
    last_key: tuple[Any, ...] | None = None
    drawn = 0
    while True:
        obj = kube.get_researchjob(ns, name)
        snap = progress.snapshot(obj, dt.datetime.now(dt.UTC))
        if tty:
            width = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line would break the redraw
            lines = [ln[:width] for ln in progress.panel(ns, name, snap)]
            _write((f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines) + "\n")
            drawn = len(lines)
        elif snap.change_key() != last_key:
            _write(progress.line(snap) + "\n")
            last_key = snap.change_key()
        if snap.finished:
            if snap.phase == "Succeeded":
                _write(f"report: kubectl research report {name} -n {ns}\n")
                return EXIT_OK
            raise CliError(f"researchjob {ns}/{name} failed: {snap.message or 'no message'}")
        if timeout and time.monotonic() - start > timeout:
            raise CliError(f"researchjob {ns}/{name} did not finish in {timeout:.0f}s (phase {snap.phase})")
        time.sleep(max(0.1, interval))


def cmd_watch(kube: Kube, args: argparse.Namespace) -> int:
    return follow(kube, kube.namespace, args.name, args.interval, args.timeout)


def cmd_analysts(kube: Kube, args: argparse.Namespace) -> int:
    obj = kube.get_researchjob(kube.namespace, args.name)
    status = obj.get("status") or {}
    analysts = status.get("analysts")
    if not analysts:
        phase = status.get("phase", "Pending")
        raise CliError(f"researchjob {kube.namespace}/{args.name} has no planned analysts yet (phase {phase})")
    if args.output in ("yaml", "json"):
        _write(dump(analysts, args.output))
        return EXIT_OK
    wide = args.output == "wide"
    headers = ["INDEX", "NAME", "ROLE", "AFFILIATION", *(["DESCRIPTION"] if wide else [])]
    rows = [
        [i, a.get("name"), a.get("role"), a.get("affiliation"), *([a.get("description")] if wide else [])]
        for i, a in enumerate(analysts)
    ]
    _write(table(headers, rows))
    review = (obj.get("spec") or {}).get("analysts") or {}
    if status.get("phase") == "AwaitingReview":
        _write(
            f"\nwaiting for review: kubectl research approve {args.name}, or "
            f'kubectl research feedback {args.name} "..."\n'
        )
    elif review.get("approved"):
        _write("\napproved\n")
    return EXIT_OK


def _patch_analysts(kube: Kube, name: str, analysts: dict[str, Any]) -> None:
    kube.call(
        f"patch researchjob {kube.namespace}/{name}",
        kube.custom.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        kube.namespace,
        PLURAL,
        name,
        {"spec": {"analysts": analysts}},
    )


def cmd_approve(kube: Kube, args: argparse.Namespace) -> int:
    obj = kube.get_researchjob(kube.namespace, args.name)
    spec = (obj.get("spec") or {}).get("analysts") or {}
    phase = (obj.get("status") or {}).get("phase") or "Pending"
    if not spec.get("review"):
        raise CliError(
            f"researchjob {kube.namespace}/{args.name} does not wait for review (spec.analysts.review is off)"
        )
    if spec.get("approved"):
        _write(f"{RESOURCE}/{args.name} was already approved\n")
        return EXIT_OK
    _patch_analysts(kube, args.name, {"approved": True})
    note = "" if phase == "AwaitingReview" else f" (in phase {phase}: the panel is approved before you saw it)"
    _write(f"{RESOURCE}/{args.name} approved{note}\n")
    return EXIT_OK


def cmd_feedback(kube: Kube, args: argparse.Namespace) -> int:
    text = args.text.strip()
    if not text:
        raise UsageError("the feedback is empty")
    if len(text) > 4000:
        raise UsageError(f"the feedback is {len(text)} characters; at most 4000")
    obj = kube.get_researchjob(kube.namespace, args.name)
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase != "AwaitingReview" and not args.force:
        raise CliError(
            f"researchjob {kube.namespace}/{args.name} is in phase {phase}, not AwaitingReview: feedback now plans "
            f"the panel again and discards its {status.get('sectionsDone', 0)} sections; add --force to do that"
        )
    _patch_analysts(kube, args.name, {"feedback": text, "approved": False})
    _write(f"{RESOURCE}/{args.name}: feedback given; the analysts are planned again (follow: kubectl research watch)\n")
    return EXIT_OK


def cmd_report(kube: Kube, args: argparse.Namespace) -> int:
    obj = kube.get_researchjob(kube.namespace, args.name)
    text = report.report_markdown(kube, obj, args.dsn_env)
    if args.format == "html":
        title = ((obj.get("status") or {}).get("report") or {}).get("title")
        text = report.to_html(text, title)
    if args.file and args.file != "-":
        try:
            Path(args.file).write_text(text)
        except OSError as exc:
            raise CliError(f"cannot write {args.file}: {exc.strerror}") from None
        sys.stderr.write(f"wrote {args.file} ({len(text.encode())} bytes)\n")
    else:
        _write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def cmd_logs(kube: Kube, args: argparse.Namespace) -> int:
    obj = kube.get_researchjob(kube.namespace, args.name)
    count = int(((obj.get("spec") or {}).get("analysts") or {}).get("count") or 3)
    if args.analyst is not None and args.analyst >= count:
        raise UsageError(f"--analyst {args.analyst}: researchjob {args.name} has analysts 0..{count - 1}")
    pods = logs.api_pods(kube, obj)
    pods_dir = logs.local_pods_dir(kube)
    if pods_dir is not None:
        seen = {p.name for p in pods}
        pods = [*(p for p in logs.local_finished_pods(pods_dir, obj) if p.name not in seen), *pods]
    chosen = logs.select(pods, args.analyst, args.step)
    if not chosen:
        what = f" of analyst {args.analyst}" if args.analyst is not None else ""
        raise CliError(
            f"no worker pods{what} of researchjob {kube.namespace}/{args.name} to show: none has started, or they "
            "were deleted (the operator deletes succeeded worker Jobs once their results are stored)"
        )
    for pod in chosen:
        who = f", analysts {','.join(map(str, pod.analysts))}" if pod.analysts else ""
        _write(f"==> pod {pod.name} ({pod.step}{who}) <==\n")
        text = logs.pod_log(kube, kube.namespace, pod, pods_dir, args.tail)
        _write(text if not text or text.endswith("\n") else text + "\n")
    return EXIT_OK


def cmd_top(kube: Kube, args: argparse.Namespace) -> int:
    scope = None if args.all_namespaces else kube.namespace
    view = admin.gather_top(kube, scope, args.operator_namespace, args.settings_configmap)
    if args.output in ("yaml", "json"):
        _write(dump(view.as_dict(), args.output))
        return EXIT_OK
    _write(
        table(
            ["CLUSTER", "RUNNING", "QUEUED", "GLOBAL CAP", "NAMESPACE CAP", "SETTINGS"],
            [
                [
                    "all namespaces",
                    view.running,
                    view.queued,
                    admin.cap_text(view.global_cap, view.running),
                    admin.cap_text(view.namespace_cap),
                    view.settings,
                ]
            ],
        )
    )
    wide = args.output == "wide"
    _write("\n")
    if not view.namespaces:
        _write(f"no worker Jobs, queued batches or ResourceQuotas in {view.scope}\n")
    else:
        _write(
            table(
                ["NAMESPACE", "RUNNING", "QUEUED", "NAMESPACE CAP", *(["RESEARCHJOBS"] if wide else [])],
                [
                    [n.namespace, n.running, n.queued, admin.cap_text(n.cap, n.running)]
                    + ([n.researchjobs] if wide else [])
                    for n in view.namespaces
                ],
            )
        )
    if view.quotas:
        _write("\n")
        _write(
            table(
                ["NAMESPACE", "RESOURCEQUOTA", "HEADROOM (WORKER PODS)", "BINDING"],
                [
                    [q.namespace, q.name, "no limit on workers" if q.headroom is None else q.headroom, q.binding or ""]
                    for q in view.quotas
                ],
            )
        )
    _write("\n")
    if view.waiting:
        _write(
            table(
                ["NAMESPACE", "RESEARCHJOB", "PHASE", "RUNNING", "QUEUED", "WAITING FOR"],
                [[w.namespace, w.name, w.phase, w.running, w.queued, w.waiting_for] for w in view.waiting],
            )
        )
    else:
        _write("no ResearchJob is waiting\n")
    return EXIT_OK


def cmd_caps(kube: Kube, args: argparse.Namespace) -> int:
    if args.action == "show" and args.assignments:
        raise UsageError("to change caps: kubectl research caps set KEY=VALUE ...")
    values = admin.parse_assignments(args.assignments) if args.action == "set" else None
    ref = admin.find_settings(kube, args.operator_namespace, args.settings_configmap)
    if values is not None:
        changes = admin.set_caps(kube, ref, values)
        for key, (old, new) in changes.items():
            _write(f"{key}: {old or '0'} -> {new}\n")
        _write(f"configmap {ref.namespace}/{ref.name} updated; the operator applies it on its next reconcile\n")
        if ref.helm_release:
            keys = " ".join(f"--set settings.{k}={v}" for k, v in values.items())
            sys.stderr.write(
                f"note: Helm release {ref.helm_release} manages this ConfigMap and its next upgrade writes the chart's "
                f"values back; to keep this, also run: helm upgrade {ref.helm_release} charts/research-operator "
                f"-n {ref.namespace} --reuse-values {keys}\n"
            )
        return EXIT_OK
    caps = {k: ref.data.get(k, "0") for k in admin.CAPS}
    in_force = admin.caps_in_force(ref.data)
    if args.output in ("yaml", "json"):
        _write(dump({"configMap": f"{ref.namespace}/{ref.name}", **caps}, args.output))
        return EXIT_OK
    _write(
        table(
            ["CAP", "VALUE", "LIMITS"],
            [[k, admin.cap_text(admin.cap_value(in_force, k)), admin.CAPS[k]] for k in caps],
        )
    )
    _write(f"(configmap {ref.namespace}/{ref.name})\n")
    return EXIT_OK


COMMANDS = {
    "submit": cmd_submit,
    "watch": cmd_watch,
    "analysts": cmd_analysts,
    "approve": cmd_approve,
    "feedback": cmd_feedback,
    "report": cmd_report,
    "logs": cmd_logs,
    "top": cmd_top,
    "caps": cmd_caps,
}


def main(argv: list[str] | None = None) -> int:
    kube: Kube | None = None
    try:
        args = build_parser().parse_args(argv)
        if args.command == "submit" and args.estimate:
            try:
                kube = connect(args.kubeconfig, args.context, args.namespace)
            except CliError as exc:  # an estimate of local documents needs no cluster
                return cmd_estimate(None, args, offline=str(exc))
            return cmd_estimate(kube, args)
        kube = connect(args.kubeconfig, args.context, args.namespace)
        return COMMANDS[args.command](kube, args)
    except CliError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - a bug still gets one line, never a traceback
        sys.stderr.write(f"error: unexpected {type(exc).__name__}: {exc}\n")
        return EXIT_ERROR
    finally:
        if kube is not None:
            kube.close()


if __name__ == "__main__":
    sys.exit(main())
