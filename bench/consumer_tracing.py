"""Command consumer: what tracing costs, with the consumer as its own process: tracing off, and on
at 1 % and 100 % of commands (spans over OTLP to a receiver in this process), in alternating rounds.

    python -m bench.consumer_tracing [--commands 100000] [--rounds 5]
"""

from __future__ import annotations

import functools
import sys
from datetime import UTC, datetime

from bench import common
from bench.common import (
    bench_environment,
    spread,
)
from bench.consumer_workload import (
    ConsumerProcess,
    consumer_process,
    generate,
    measure_until_stored,
    preload,
    seed_segments,
)
from devstack.otlp_sink import OtlpSink

TRACING_ROUNDS = (("process, tracing off", None), ("process, tracing 1%", 0.01), ("process, tracing 100%", 1.0))


def paired(traced: dict[str, list[float]], label: str) -> list[float]:
    """Each round's traced rate over the same round's untraced one."""
    return [on / off for on, off in zip(traced[label], traced["process, tracing off"], strict=True)]


async def tracing_rounds(args, new, commands: list[dict]) -> dict[str, str]:
    """The consumer as its own process, as deployed: tracing off, and on at 1 % and 100 % of
    commands (spans over OTLP to a receiver in this process), in alternating rounds. The commands
    carry trace context as from producers that trace as much (the gateway, the client and
    segmentctl do), so each command's own sampling decision is part of the cost."""
    traced: dict[str, list[float]] = {label: [] for label, _ in TRACING_ROUNDS}
    cpu: dict[str, list[float]] = {label: [] for label, _ in TRACING_ROUNDS}
    with OtlpSink() as sink:
        for round_number in range(1, args.rounds + 1):
            shift = (round_number - 1) % len(TRACING_ROUNDS)  # no variant always runs first
            for label, ratio in TRACING_ROUNDS[shift:] + TRACING_ROUNDS[:shift]:
                extra = {} if ratio is None else {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
                settings, pool = await new(f"tracing_{str(ratio or 0).replace('.', '_')}_{round_number}")
                await seed_segments(pool, args.segments)
                await preload(settings, commands, traced_share=0.01 if ratio is None else ratio)
                watch = ConsumerProcess()
                rate, cpu_us = await measure_until_stored(
                    pool, len(commands), f"round {round_number}/{args.rounds}: {label}",
                    functools.partial(consumer_process, settings, extra, watch), watch.cpu_seconds)
                traced[label].append(rate)
                cpu[label].append(cpu_us)
                print(f"    {rate:,.0f} commands/s, consumer CPU {cpu_us:.1f} µs a command", file=sys.stderr)
    per_cpu = {label: [1 / value for value in values] for label, values in cpu.items()}  # commands a CPU µs
    return {**{label: f"{spread(rates)} commands/s, consumer CPU {spread(cpu[label], '{:.1f}')} µs a command"
               for label, rates in traced.items()},
            "tracing 1% / off": f"{spread(paired(traced, 'process, tracing 1%'), '{:.1%}')}   (target >= 97%)",
            "tracing 1% / off, commands a CPU second": spread(paired(per_cpu, 'process, tracing 1%'), '{:.1%}'),
            "tracing 100% / off": f"{spread(paired(traced, 'process, tracing 100%'), '{:.1%}')}   "
                                  "(every command traced)",
            "tracing 100% / off, commands a CPU second": spread(paired(per_cpu, 'process, tracing 100%'), '{:.1%}')}


async def main(args) -> None:
    async with bench_environment("consumer-tracing", topic_partitions=args.partitions) as (_infra, new):
        lines = await tracing_rounds(args, new, generate(args.commands, args.users, args.segments))
    common.report(f"consumer tracing ({datetime.now(UTC):%Y-%m-%d}, {args.partitions} partitions, "
                  f"{args.users:,} users, {args.segments} segments)", lines)


def cli() -> None:
    common.cli(__doc__, main, commands=100_000, rounds=5, users=100_000, segments=50, partitions=8)


if __name__ == "__main__":
    cli()
