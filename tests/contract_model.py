"""The whole contract as a simple in-memory model, to compare the real pipeline against.

Written from the contract's rules (the README's "The contract, in short"), not from the
consumer's code: dictionaries and sets, one command at a time. It covers all five command types,
TTLs (kept long enough not to expire during a test), percent rollout with exclusions, segment
deletion and re-creation, repeated command ids, and the rows of a user's report.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from shared.rollout import rollout_bucket

PERCENTS = [0, 5, 12.5, 33.33, 50, 100]


class ContractModel:
    def __init__(self, universe: Iterable[int] = ()) -> None:
        # Users whose report rows the model predicts, rollout rows included (seen or not).
        self.universe = list(universe)
        self.report: dict[tuple[int, str], list[tuple[str, str, str]]] = {}  # (user, slug) → (op, source, reason)
        self.segments: dict[str, Decimal] = {}  # live slug → percent
        self.users: set[int] = set()
        self.explicit: dict[tuple[int, str], tuple[str, Any, str] | None] = {}  # → (kind, value, command id)
        self.excluded: set[tuple[int, str]] = set()
        self.history: dict[int, list[tuple[str, str, str]]] = {}  # user → (slug, operation, reason)
        self.rollout_events: Counter[str] = Counter()
        self.outcomes: dict[str, tuple[str, str | None]] = {}  # command id → (status, error code)

    # -- rules ---------------------------------------------------------------------------------
    def covered(self, user_id: int, slug: str) -> bool:
        threshold = int(self.segments[slug] * 100)
        return rollout_bucket(slug, user_id) < threshold

    def is_member(self, user_id: int, slug: str) -> bool:
        if slug not in self.segments:
            return False
        return (user_id, slug) in self.explicit or (
            self.covered(user_id, slug) and (user_id, slug) not in self.excluded)

    def _report(self, user_id: int, slug: str, operation: str, source: str, reason: str) -> None:
        self.report.setdefault((user_id, slug), []).append((operation, source, reason))

    def _rollout_moves(self, slug: str, before: Decimal, after: Decimal, reason: str) -> None:
        """The rows a rollout change means for every user of the universe it moves: those with
        no explicit membership or exclusion for the segment at that moment."""
        for user_id in self.universe:
            if (user_id, slug) in self.explicit or (user_id, slug) in self.excluded:
                continue
            bucket = rollout_bucket(slug, user_id)
            was_in, is_in = bucket < round(before * 100), bucket < round(after * 100)
            if was_in != is_in:
                self._report(user_id, slug, "I" if is_in else "D", "auto", reason)

    def members_of(self, user_id: int) -> list[str]:
        return sorted(slug for slug in self.segments if self.is_member(user_id, slug))

    def apply(self, command: dict[str, Any]) -> None:
        command_id = command["command_id"]
        if command_id in self.outcomes:
            return  # seen before: changes nothing
        handler = getattr(self, f"_{command['type']}")
        self.outcomes[command_id] = handler(command)

    def _create_segment(self, c):
        if c["slug"] in self.segments:
            return ("rejected", "segment_exists")
        percent = Decimal(str(c.get("percent", 0)))
        self.segments[c["slug"]] = percent
        if percent > 0:
            self.rollout_events[c["slug"]] += 1
            self._rollout_moves(c["slug"], Decimal(0), percent, "created")
        return ("applied", None)

    def _update_segment(self, c):
        if c["slug"] not in self.segments:
            return ("rejected", "segment_not_found")
        if "percent" in c:
            percent = Decimal(str(c["percent"]))
            if percent != self.segments[c["slug"]]:
                self.rollout_events[c["slug"]] += 1
                self._rollout_moves(c["slug"], self.segments[c["slug"]], percent, "percent_changed")
            self.segments[c["slug"]] = percent
        return ("applied", None)

    def _delete_segment(self, c):
        slug = c["slug"]
        if slug not in self.segments:
            return ("rejected", "segment_not_found")
        percent = self.segments.pop(slug)
        if percent > 0:
            self.rollout_events[slug] += 1
            self._rollout_moves(slug, percent, Decimal(0), "segment_deleted")
        for user_id, member_slug in [key for key in self.explicit if key[1] == slug]:
            del self.explicit[(user_id, member_slug)]
            self.history.setdefault(user_id, []).append((slug, "D", "segment_deleted"))
            self._report(user_id, slug, "D", "manual", "segment_deleted")
        self.excluded = {key for key in self.excluded if key[1] != slug}
        return ("applied", None)

    def _create_user(self, c):
        self.users.add(c["user_id"])
        return ("applied", None)

    def _update_user_segments(self, c):
        user_id, add, remove = c["user_id"], c.get("add", []), c.get("remove", [])
        if set(add) & set(remove):
            return ("rejected", "conflicting_segments")
        if any(slug not in self.segments for slug in add):
            return ("rejected", "segment_not_found")
        self.users.add(user_id)
        expiry = (("ttl", c["ttl_seconds"], c["command_id"]) if "ttl_seconds" in c
                  else ("at", c["expires_at"], c["command_id"]) if "expires_at" in c else None)
        log = self.history.setdefault(user_id, [])
        for slug in dict.fromkeys(add):
            was_member = self.is_member(user_id, slug)
            self.explicit[(user_id, slug)] = expiry
            self.excluded.discard((user_id, slug))
            if not was_member:
                log.append((slug, "I", "manual"))
                self._report(user_id, slug, "I", "manual", "manual")
        for slug in dict.fromkeys(remove):
            if slug not in self.segments:
                continue
            was_member = self.is_member(user_id, slug)
            self.explicit.pop((user_id, slug), None)
            if self.covered(user_id, slug):
                self.excluded.add((user_id, slug))
            if was_member:
                log.append((slug, "D", "manual"))
                self._report(user_id, slug, "D", "manual", "manual")
        return ("applied", None)

    # -- comparison with the database ------------------------------------------------------------
    async def assert_matches(self, pool: asyncpg.Pool, scope: Scope | None = None) -> dict[str, int]:
        """Everything the model predicts, compared with what is stored; returns the counts. With a
        scope, only its users, segments and command ids are compared (others share the database)."""
        scope = scope or Scope()
        live = {row["slug"]: row["percent"] for row in await pool.fetch(
            "SELECT slug, percent FROM segments WHERE deleted_at IS NULL") if scope.slug(row["slug"])}
        assert live == self.segments
        assert {row[0] for row in await pool.fetch("SELECT user_id FROM users") if scope.user(row[0])} == self.users

        outcome_rows = [row for row in await pool.fetch(
            "SELECT command_id, status, error->>'code' AS code, processed_at FROM command_outcomes")
            if scope.command(row["command_id"])]
        processed_at = {row["command_id"]: row["processed_at"] for row in outcome_rows}
        stored_outcomes = {row["command_id"]: (row["status"], row["code"]) for row in outcome_rows}
        assert stored_outcomes == self.outcomes

        memberships = {(row["user_id"], row["slug"]): row["expires_at"] for row in await pool.fetch(
            "SELECT m.user_id, s.slug, m.expires_at FROM memberships m JOIN segments s ON s.id = m.segment_id")
            if scope.user(row["user_id"])}
        assert set(memberships) == set(self.explicit)
        for key, expiry in self.explicit.items():
            if expiry is None:
                assert memberships[key] is None, key
            elif expiry[0] == "ttl":
                assert memberships[key] == processed_at[expiry[2]] + timedelta(seconds=expiry[1]), key
            else:
                assert memberships[key] == datetime.fromisoformat(expiry[1]), key

        exclusions = {(row["user_id"], row["slug"]) for row in await pool.fetch(
            "SELECT e.user_id, s.slug FROM rollout_exclusions e JOIN segments s ON s.id = e.segment_id")
            if scope.user(row["user_id"])}
        assert exclusions == self.excluded

        history: dict[int, list[tuple[str, str, str]]] = {}
        for row in await pool.fetch(
                "SELECT user_id, segment_slug, operation, reason FROM membership_history ORDER BY id"):
            if scope.user(row["user_id"]):
                history.setdefault(row["user_id"], []).append(
                    (row["segment_slug"], row["operation"], row["reason"]))
        expected_history = {user: rows for user, rows in self.history.items() if rows}
        # Order is per key: a user's own commands keep their order across segments; deletions of
        # different segments (other keys, other partitions) may interleave with each other.
        assert _by_user_segment(history) == _by_user_segment(expected_history)
        assert _user_commands_only(history) == _user_commands_only(expected_history)

        events = Counter({row["segment_slug"]: row["n"] for row in await pool.fetch(
            "SELECT segment_slug, count(*) AS n FROM rollout_events GROUP BY 1") if scope.slug(row["segment_slug"])})
        assert events == self.rollout_events
        statuses = Counter(status for status, _ in self.outcomes.values())
        return {"outcomes": len(stored_outcomes), "applied": statuses["applied"], "rejected": statuses["rejected"],
                "memberships": len(memberships), "exclusions": len(exclusions),
                "history rows": sum(len(rows) for rows in history.values()),
                "history rows predicted": sum(len(rows) for rows in expected_history.values()),
                "rollout events": sum(events.values())}


@dataclass(frozen=True)
class Scope:
    """The part of a shared database one model owns: users in a range, slugs and command ids with a prefix."""

    users: range | None = None
    prefix: str = ""

    def user(self, user_id: int) -> bool:
        return self.users is None or user_id in self.users

    def slug(self, slug: str) -> bool:
        return slug.startswith(self.prefix)

    def command(self, command_id: str) -> bool:
        return command_id.startswith(self.prefix)


def _by_user_segment(history: dict[int, list[tuple[str, str, str]]]) -> dict[tuple[int, str], list]:
    grouped: dict[tuple[int, str], list] = {}
    for user_id, rows in history.items():
        for slug, operation, reason in rows:
            grouped.setdefault((user_id, slug), []).append((operation, reason))
    return grouped


def _user_commands_only(history: dict[int, list[tuple[str, str, str]]]) -> dict[int, list]:
    return {user_id: [row for row in rows if row[2] != "segment_deleted"] for user_id, rows in history.items()}


class CommandMaker:
    """Random commands of all five types, biased towards what makes the rules interesting."""

    def __init__(self, rng: random.Random, slugs: list[str], users: int) -> None:
        self.rng, self.slugs, self.users = rng, slugs, users
        self.count = 0

    def _id(self) -> str:
        self.count += 1
        return f"c{self.count}"

    def segment_command(self, model: ContractModel) -> dict[str, Any]:
        rng, slug = self.rng, self.rng.choice(self.slugs)
        kind = rng.choices(["create_segment", "update_segment", "delete_segment"],
                           [3, 4, 1] if slug in model.segments else [6, 1, 1])[0]
        command: dict[str, Any] = {"type": kind, "slug": slug, "command_id": self._id()}
        if kind == "create_segment":
            command["percent"] = rng.choice(PERCENTS)
        elif kind == "update_segment":
            if rng.random() < 0.8:
                command["percent"] = rng.choice(PERCENTS)
            if rng.random() < 0.3 or "percent" not in command:
                command["description"] = f"round {self.count}"
        return command

    def user_command(self) -> dict[str, Any]:
        rng = self.rng
        user_id = rng.randint(1, self.users)
        if rng.random() < 0.1:
            return {"type": "create_user", "user_id": user_id, "command_id": self._id()}
        picks = rng.sample([*self.slugs, "MISSING"], rng.randint(1, 3))
        split = rng.randint(0, len(picks))
        command: dict[str, Any] = {"type": "update_user_segments", "user_id": user_id, "add": picks[:split],
                                   "remove": picks[split:], "command_id": self._id()}
        if rng.random() < 0.03 and command["add"]:
            command["remove"].append(command["add"][0])  # conflicting
        roll = rng.random()
        if roll < 0.2:
            command["ttl_seconds"] = rng.randint(3600, 30 * 86_400)
        elif roll < 0.3:
            at = datetime.now(UTC) + timedelta(days=rng.randint(1, 90), microseconds=rng.randint(0, 999) * 1000)
            command["expires_at"] = at.isoformat()
        return command


SEGMENTS = [f"S{i}" for i in range(6)]
SEGMENT_PERCENTS = [0, 0, 10, 25, 50, 100]


def scenario(count: int, users: int, seed: int) -> tuple[ContractModel, list[dict], list[dict]]:
    """A test's commands and what the contract says of them: the commands creating SEGMENTS, to be
    applied first, `count` random user commands of both kinds after them, and the model that has
    applied them all in that order."""
    model = ContractModel()
    segments = [{"type": "create_segment", "slug": slug, "command_id": f"create-{slug}", "percent": percent}
                for slug, percent in zip(SEGMENTS, SEGMENT_PERCENTS, strict=True)]
    maker = CommandMaker(random.Random(seed), SEGMENTS, users)
    commands = [maker.user_command() for _ in range(count)]
    for command in [*segments, *commands]:
        model.apply(command)
    return model, segments, commands
