"""``report``: the finished report from whichever store holds it, as Markdown or HTML.

``status.report`` names it: a ConfigMap and key (the ConfigMap store), or a PostgreSQL report id
(the postgres store), read with the worker's own reader. The DSN comes from ``--dsn-env`` (a
variable in the caller's environment) or else from the Secret the ResearchJob names in
``spec.store.dsnSecretRef``, if the caller may read it. HTML is rendered by markdown-it-py
(CommonMark) with raw HTML disabled: report text quotes untrusted search results and stays data.
"""

from __future__ import annotations

import asyncio
import base64
import html
import os
from typing import Any

from research_api.names import parse_postgres_report_id
from research_cli.errors import CliError
from research_cli.kube import Kube


def report_markdown(kube: Kube, rj: dict[str, Any], dsn_env: str | None) -> str:
    meta, status = rj["metadata"], rj.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    ref = status.get("report") or {}
    if not ref:
        phase = status.get("phase") or "Pending"
        why = f": {status['message']}" if status.get("message") else ""
        raise CliError(f"researchjob {ns}/{name} has no report yet (phase {phase}{why})")
    if ref.get("postgresId"):
        return _postgres_report(kube, rj, str(ref["postgresId"]), dsn_env)
    if not ref.get("configMap") or not ref.get("key"):
        raise CliError(f"researchjob {ns}/{name} names no report ConfigMap in status.report: {ref}")
    cm = kube.call(f"get configmap {ns}/{ref['configMap']}", kube.core.read_namespaced_config_map, ref["configMap"], ns)
    data = cm.data or {}
    if ref["key"] not in data:
        raise CliError(f"configmap {ns}/{ref['configMap']} has no key {ref['key']}")
    return str(data[ref["key"]])


def _postgres_report(kube: Kube, rj: dict[str, Any], report_id: str, dsn_env: str | None) -> str:
    ns, name = rj["metadata"]["namespace"], rj["metadata"]["name"]
    if dsn_env:
        dsn = os.environ.get(dsn_env)
        if not dsn:
            raise CliError(f"--dsn-env {dsn_env}: the variable is not set")
    else:
        ref = ((rj.get("spec") or {}).get("store") or {}).get("dsnSecretRef") or {}
        if not ref.get("name") or not ref.get("key"):
            raise CliError(f"researchjob {ns}/{name} names no DSN Secret; give --dsn-env VARIABLE")
        secret = kube.call(
            f"read the DSN from secret {ns}/{ref['name']} (or give --dsn-env VARIABLE)",
            kube.core.read_namespaced_secret,
            ref["name"],
            ns,
        )
        raw = (secret.data or {}).get(ref["key"])
        if not raw:
            raise CliError(f"secret {ns}/{ref['name']} has no key {ref['key']}")
        dsn = base64.b64decode(raw).decode()
    try:
        uid, plan = parse_postgres_report_id(report_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # The worker's reader (psycopg); imported here so the ConfigMap path needs no database driver.
    from research_worker.errors import WorkerError
    from research_worker.store import read_postgres_report

    try:
        report = asyncio.run(read_postgres_report(dsn, uid, plan))
    except WorkerError as exc:
        raise CliError(str(exc).replace(dsn, "<dsn>")) from None
    if report is None:
        raise CliError(f"report {report_id} of researchjob {ns}/{name} is not in PostgreSQL")
    return report.markdown


def to_html(markdown: str, title: str | None) -> str:
    """A standalone HTML page of the report."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title or 'Research report')}</title>\n"
        "<style>body{max-width:50em;margin:2em auto;padding:0 1em;font-family:sans-serif;line-height:1.5}</style>\n"
        f"</head>\n<body>\n{body}</body>\n</html>\n"
    )
