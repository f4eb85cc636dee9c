"""What a ResearchJob will spend, before it spends anything: model calls, prompt and completion tokens,
and their cost at its ModelEndpoint's prices.

One function, ``estimate``, used by ``kubectl research submit --estimate`` and by the operator (the
ceiling ``spec.budget.maxEstimatedTokens`` / ``maxEstimatedCost`` and ``status.estimate``). It follows
the research assistant call by call, as the worker builds its prompts (``research_api.prompts``, the
same text the worker sends; ``research_api.documents``, the passages it searches; the schemas of
``research_api.answers``):

* **plan**: one structured call; its prompt holds the topic and the start of every document
  (the planner's overview).
* **interview**, per analyst and turn: a question, a search query (structured) and the expert's
  answer. Each prompt holds the conversation so far; the answer's also the passages retrieved so far.
  Then one call writes the analyst's section from those passages.
* **write**: the report body, its introduction and its conclusion, each from every section.

What the prompts are built from is known before the job runs (the spec, the prompt text, the
documents); what the model answers is not. The estimate assumes the answer lengths of
``AnswerLengths`` (taken from what each prompt asks for, where it says, e.g. a section of "approximately
400 words maximum"), each at most ``spec.model.maxOutputTokens``, and counts text in tokens as
``count_tokens`` does. Retrieval is taken as ``maxResults`` passages drawn per search from the whole
corpus, so several searches of one interview find some passages again (fewer new ones the smaller
the corpus), plus, at the first search, a passage of each document the plan assigns to the analyst
that the draw missed. Web sources (``tavily``, ``wikipedia``) are unknown before they are searched:
each result is counted at ``WEB_RESULT_TOKENS``. A quality floor may make writers write once more
(``spec.quality``), and review feedback plans again: those calls are not in the estimate, which the
``basis`` says.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from research_api import prompts
from research_api.answers import SearchQuery, perspectives_of
from research_api.apimodel import money
from research_api.documents import (
    DOC_SUFFIXES,
    overview_chars,
    overview_limit,
    overview_shown,
    overview_text,
    split_markdown,
)
from research_api.modelendpoint import Prices
from research_api.researchjob import ResearchJobSpec, SourceType
from research_api.status import EstimateStatus, StepEstimate

# A token: a run of letters and digits, or one punctuation mark. Tokenizers differ; for English prose
# a BPE tokenizer makes about as many (OpenAI: a token is about 3/4 of a word, and words are about as
# many as their punctuation marks plus 1/3), and this count needs no vocabulary download.
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# Chat framing (OpenAI's cookbook, "How to count tokens"): each message costs 3 tokens and its role
# one more; every request is primed with 3.
MESSAGE_TOKENS = 4
REQUEST_TOKENS = 3
# A web search result before it is searched: Tavily returns a content snippet of a few sentences;
# the wikipedia source a page's summary (its lead section, a few paragraphs).
WEB_RESULT_TOKENS = {SourceType.tavily: 150, SourceType.wikipedia: 500}
WIKIPEDIA_MAX_DOCS = 10  # the worker's wikipedia source takes at most this many pages per search


def count_tokens(text: str) -> int:
    """Tokens of ``text``: words and punctuation marks."""
    return len(_TOKEN.findall(text))


@dataclass(frozen=True)
class AnswerLengths:
    """How many tokens the model is assumed to write for each kind of answer (each at most
    ``spec.model.maxOutputTokens``). From what each prompt asks for, where it says:"""

    # an analyst persona: a name, a role and an affiliation of a few words each, and a description
    # of its focus, concerns and motives in a sentence or two (the plan's JSON adds its keys)
    name: int = 3
    role: int = 6
    affiliation: int = 6
    description: int = 45
    # the analyst introduces itself and asks one question (question_instructions)
    question: int = 60
    # "a well-structured query" (search_instructions), one line
    query: int = 15
    # the expert answers one question from the context, citing [n], and lists its sources
    answer: int = 150
    # a section: "Aim for approximately 400 words maximum" with a title and a Sources list
    section: int = 400
    # the report body consolidates the memos into "a crisp overall summary": about a section's length
    report: int = 400
    # "Target around 100 words" (intro_conclusion_instructions), with a title or heading
    intro: int = 130

    @property
    def persona(self) -> int:
        """An analyst's persona as the interview prompts show it (research_api.records.Analyst.persona)."""
        labels = count_tokens("Name: \nRole: \nAffiliation: \nDescription: \n")
        return labels + self.name + self.role + self.affiliation + self.description

    def analysts_json(self, count: int) -> int:
        """The plan's structured answer: ``count`` personas in their JSON."""
        one = json.dumps({"affiliation": "", "name": "", "role": "", "description": ""})
        each = count_tokens(one) + self.name + self.role + self.affiliation + self.description
        return count_tokens(json.dumps({"analysts": []})) + count * each + (count - 1)


ANSWERS = AnswerLengths()


@dataclass(frozen=True)
class Corpus:
    """What the estimate needs of the documents sources: every passage's tokens, as the worker splits
    them, and what the planner's overview shows of each document."""

    documents: int
    passages: list[int]  # tokens of each passage as a context shows it (its title and text)
    overview: list[str]  # each document's text as the overview shows it, uncut

    @classmethod
    def of(cls, documents: Mapping[str, str]) -> Corpus:
        docs = {k: v for k, v in sorted(documents.items()) if k.endswith(DOC_SUFFIXES)}
        passages = [p for src, text in docs.items() for p in split_markdown(src, text)]
        shown = [overview_text(src, passages, text) for src, text in docs.items()]
        return cls(
            documents=len(docs),
            passages=[count_tokens(f"{p.title}\n{p.content}" if p.title else p.content) for p in passages],
            overview=[t for t in shown if t.strip()],
        )

    @property
    def mean_passage(self) -> float:
        return sum(self.passages) / len(self.passages) if self.passages else 0.0


def _request(*parts: float) -> float:
    """Prompt tokens of a request whose messages hold ``parts`` tokens each."""
    return REQUEST_TOKENS + sum(p + MESSAGE_TOKENS for p in parts)


def _schema_tokens(schema: dict[str, object]) -> int:
    return count_tokens(json.dumps(schema))


def _formatted(text: str, **fields: object) -> int:
    """Tokens of a prompt template with ``fields`` left empty (their tokens are added by the caller)."""
    return count_tokens(text.format(**{k: "" for k in fields}))


def _distinct(draws: float, pool: int) -> float:
    """Expected distinct passages after ``draws`` passages drawn at random from ``pool``."""
    if pool <= 0:
        return 0.0
    return float(pool * (1 - (1 - 1 / pool) ** draws))


def estimate(
    spec: ResearchJobSpec,
    documents: Mapping[str, str] | None,
    prices: Prices | None = None,
    answers: AnswerLengths = ANSWERS,
) -> EstimateStatus:
    """The calls, tokens and cost of a ResearchJob with ``spec`` over ``documents`` (every document of
    its documents sources; None when it has none), at ``prices`` (None: the cost is unknown)."""
    analysts = spec.analysts.count
    turns = spec.interview.max_turns
    bound = spec.model.max_output_tokens

    def out(tokens: int) -> int:
        return min(tokens, bound)

    topic = count_tokens(spec.topic)
    feedback = count_tokens(spec.analysts.feedback or "")
    has_documents = any(s.type == SourceType.documents for s in spec.sources)
    corpus = Corpus.of(documents or {}) if has_documents else Corpus(0, [], [])
    top_k = max((s.max_results for s in spec.sources if s.type == SourceType.documents), default=0)
    web = [
        (min(s.max_results, WIKIPEDIA_MAX_DOCS) if s.type == SourceType.wikipedia else s.max_results)
        * WEB_RESULT_TOKENS[s.type]
        for s in spec.sources
        if s.type != SourceType.documents
    ]
    searchable = bool(corpus.passages) or bool(web)
    notes: list[str] = []

    # plan: one structured call
    plan_system = _formatted(prompts.analyst_instructions, topic=0, human_analyst_feedback=0, max_analysts=0)
    plan_system += topic + feedback + count_tokens(str(analysts))
    if corpus.overview:
        shown = corpus.overview[: overview_shown(overview_limit(analysts, corpus.documents))]
        chars = overview_chars(len(shown))
        overview = sum(count_tokens(t[:chars]) for t in shown) + _context_framing(len(shown))
        plan_system += _formatted(prompts.analyst_documents, context=0) + overview
    plan_in = _request(plan_system, count_tokens(prompts.analyst_request))
    plan_in += _schema_tokens(perspectives_of(analysts).model_json_schema())
    plan_out = out(answers.analysts_json(analysts))

    # interview, per analyst
    persona = answers.persona
    question, query, answer = out(answers.question), out(answers.query), out(answers.answer)
    opening = count_tokens(prompts.interview_opening.format(topic=spec.topic))
    ask_system = _formatted(prompts.question_instructions, goals=0) + persona
    query_system = count_tokens(prompts.search_instructions)
    answer_system = _formatted(prompts.answer_instructions, goals=0, context=0) + persona
    query_schema = _schema_tokens(SearchQuery.model_json_schema())
    pool = len(corpus.passages)
    assigned = corpus.documents / analysts if corpus.documents else 0.0
    # a passage of an assigned document is added when the first draw of top_k hit none of its passages
    missed = assigned * (1 - 1 / corpus.documents) ** top_k if corpus.documents else 0.0
    calls = 0
    iv_in = iv_out = context = 0.0
    if searchable:
        history = [opening]  # the conversation: the opening, then each question and answer
        for turn in range(1, turns + 1):
            found = min(pool, _distinct(turn * top_k, pool) + missed) if pool else 0.0
            context = found * corpus.mean_passage + _context_framing(min(found, corpus.documents)) + turn * sum(web)
            iv_in += _request(ask_system, *history)
            iv_in += _request(query_system, *history, question) + query_schema
            iv_in += _request(answer_system + context, *history, question)
            iv_out += question + query + answer
            history += [question, answer]
            calls += 3
        writer = _formatted(prompts.section_writer_instructions, focus=0) + answers.description
        request = _formatted(prompts.section_request, context=0) + context
        iv_in += _request(writer, request)
        iv_out += out(answers.section)
        calls += 1
    else:
        notes.append("nothing to search: no interview calls")

    # write: the body, the introduction and the conclusion, each from every section's memo
    memos = analysts * out(answers.section) if searchable else 0
    write_in = 0.0
    write_out = write_calls = 0
    if searchable:
        report_system = _formatted(prompts.report_writer_instructions, topic=0, context=0) + topic + memos
        intro_system = _formatted(prompts.intro_conclusion_instructions, topic=0, formatted_str_sections=0)
        intro_system += topic + memos
        write_in = _request(report_system, count_tokens(prompts.report_request))
        write_in += _request(intro_system, count_tokens(prompts.introduction_request))
        write_in += _request(intro_system, count_tokens(prompts.conclusion_request))
        write_out = out(answers.report) + 2 * out(answers.intro)
        write_calls = 3

    if has_documents and documents is None:
        notes.append("documents unknown: counted as none")
    if web:
        notes.append("web results counted at " + ", ".join(f"{WEB_RESULT_TOKENS[t]} tokens ({t})" for t in _web(spec)))
    if spec.quality.min_citation_accuracy is not None or spec.quality.min_coverage is not None:
        notes.append("rewrites below the quality floor not counted")
    if spec.analysts.review:
        notes.append("plans again after review feedback not counted")

    steps = [
        StepEstimate(step="plan", calls=1, input_tokens=round(plan_in), output_tokens=plan_out),
        StepEstimate(
            step="interview",
            calls=calls * analysts,
            input_tokens=round(iv_in * analysts),
            output_tokens=round(iv_out * analysts),
        ),
        StepEstimate(step="write", calls=write_calls, input_tokens=round(write_in), output_tokens=write_out),
    ]
    total_in = sum(s.input_tokens for s in steps)
    total_out = sum(s.output_tokens for s in steps)
    cost = None
    if prices is not None:
        amount = (
            total_in * Decimal(prices.input_per_million) + total_out * Decimal(prices.output_per_million)
        ) / Decimal(1_000_000)
        cost = money(amount)
    basis = f"{corpus.documents} documents, {len(corpus.passages)} passages" if has_documents else "no documents"
    return EstimateStatus(
        calls=sum(s.calls for s in steps),
        input_tokens=total_in,
        output_tokens=total_out,
        tokens=total_in + total_out,
        cost=cost,
        basis="; ".join([basis, *notes]),
        steps=steps,
    )


def _context_framing(documents: float) -> int:
    """The delimiters of a context with passages of ``documents`` documents (format_context)."""
    per_document = count_tokens('<Document n="1" source="document.md"/>\n\n</Document>')
    return count_tokens("<context>\n</context>") + math.ceil(documents * per_document)


def _web(spec: ResearchJobSpec) -> list[SourceType]:
    return list(dict.fromkeys(s.type for s in spec.sources if s.type != SourceType.documents))
