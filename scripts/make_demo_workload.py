"""Regenerate the demo workload shipped in src/batchwise/data/demo_workload.jsonl.

    python scripts/make_demo_workload.py

About 2,000 requests a small company might send in a day: support triage that must answer
now, contract summaries due the same afternoon, an overnight digest, embeddings for search,
across OpenAI and Anthropic models, with tags for use case, workflow step and business unit,
and a few identical requests (the same FAQ asked twice).
"""

from __future__ import annotations

import random
from pathlib import Path

import orjson

OUT = Path(__file__).resolve().parent.parent / "src/batchwise/data/demo_workload.jsonl"

CUSTOMERS = [
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark Industries",
    "Wayne Enterprises",
    "Wonka",
    "Tyrell",
    "Soylent",
    "Cyberdyne",
    "Oscorp",
]
ISSUES = [
    "cannot log in after the password reset",
    "was charged twice this month",
    "export to CSV times out",
    "wants to add ten seats",
    "reports slow dashboards",
    "asks how to rotate the API key",
    "needs an invoice copy for March",
    "sees a 502 error on upload",
]
CLAUSES = [
    "limitation of liability",
    "termination for convenience",
    "data processing",
    "service levels and credits",
    "renewal and price increases",
    "governing law",
    "confidentiality",
    "intellectual property",
]
TOPICS = [
    "quarterly revenue",
    "customer churn",
    "pipeline coverage",
    "support backlog",
    "infrastructure spend",
    "hiring plan",
    "product usage",
    "regional sales",
]
TRIAGE = "Classify the ticket: billing, bug, how-to or sales. Then draft a one-line reply."
ANALYST = "You are a careful contracts analyst. Quote the clause before judging it."
FAQ = [
    "How do I reset my password?",
    "What is your refund policy?",
    "Do you offer an annual plan?",
    "Where can I download invoices?",
]


def main() -> None:
    rnd = random.Random(2026)
    lines = []
    # Support triage: answer now (realtime) or within 15 minutes.
    for i in range(300):
        customer, issue = rnd.choice(CUSTOMERS), rnd.choice(ISSUES)
        lines.append(
            {
                "custom_id": f"triage-{i}",
                "model": "gpt-4o-mini",
                "max_tokens": 120,
                "messages": [
                    {"role": "system", "content": TRIAGE},
                    {"role": "user", "content": f"Ticket from {customer}: the customer {issue}."},
                ],
                "tolerance": "realtime" if i % 3 == 0 else "15m",
                "tags": {
                    "use_case": "support_triage",
                    "step": "classify",
                    "business_unit": "support",
                    "task_id": f"ticket-{i}",
                },
            }
        )
    # FAQ answers: identical requests, asked again and again.
    for i in range(100):
        lines.append(
            {
                "custom_id": f"faq-{i}",
                "model": "claude-haiku-4-5",
                "max_tokens": 150,
                "messages": [{"role": "user", "content": FAQ[i % len(FAQ)]}],
                "tolerance": "4h",
                "tags": {"use_case": "faq_answers", "step": "answer", "business_unit": "support"},
            }
        )
    # Contract review: summarise clauses, then a risk note per contract; due in 4 hours.
    for c in range(150):
        customer = CUSTOMERS[c % len(CUSTOMERS)]
        for clause in rnd.sample(CLAUSES, 4):
            lines.append(
                {
                    "custom_id": f"contract-{c}-{clause.replace(' ', '_')[:20]}",
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 300,
                    "system": ANALYST,
                    "messages": [
                        {
                            "role": "user",
                            "content": (
                                f"Summarise the {clause} clause of the master agreement "
                                f"with {customer} (contract {c}) and flag anything unusual."
                            ),
                        }
                    ],
                    "tolerance": "4h",
                    "tags": {
                        "use_case": "contract_review",
                        "step": "summarise_clause",
                        "business_unit": "legal",
                        "task_id": f"contract-{c}",
                    },
                }
            )
    # Overnight digest: one report per team, due by 07:00.
    for d in range(200):
        topic = rnd.choice(TOPICS)
        lines.append(
            {
                "custom_id": f"digest-{d}",
                "model": "gpt-4.1-mini",
                "max_tokens": 400,
                "messages": [
                    {"role": "system", "content": "Write a crisp morning digest for executives."},
                    {
                        "role": "user",
                        "content": (
                            f"Digest {d}: summarise yesterday's {topic} figures for team {d % 20} "
                            "and list three risks."
                        ),
                    },
                ],
                "tolerance": "24h",
                "tags": {"use_case": "nightly_digest", "step": "draft", "business_unit": "finance"},
            }
        )
    # Search index: embeddings, whenever within two days.
    for e in range(600):
        lines.append(
            {
                "custom_id": f"embed-{e}",
                "model": "text-embedding-3-small",
                "input": (
                    f"Knowledge base article {e}: {rnd.choice(TOPICS)} for {rnd.choice(CUSTOMERS)}."
                ),
                "tolerance": "2d",
                "tags": {"use_case": "search_index", "step": "embed", "business_unit": "product"},
            }
        )
    rnd.shuffle(lines)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    print(f"wrote {len(lines)} lines to {OUT}")


if __name__ == "__main__":
    main()
