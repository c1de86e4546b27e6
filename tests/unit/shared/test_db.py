"""The one backoff every database retry uses (consumer batches, partition leases, expiry worker)."""

from shared.db import Backoff


def test_waits_double_from_a_tenth_of_a_second_up_to_the_cap_with_jitter_and_reset():
    backoff = Backoff(cap=1.0)
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for base in bases:
        assert base * 0.5 <= backoff.next() <= base * 1.5
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.15


def test_migrations_reach_every_host_of_a_multi_host_url():
    from shared.db import yoyo_url

    assert yoyo_url("postgresql://u:p@db:5432/seg") == "postgresql+psycopg://u:p@db:5432/seg"
    assert yoyo_url("postgresql://u:p@a:5432,b:5433/seg?target_session_attrs=read-write&sslmode=require") == (
        "postgresql+psycopg://u:p@/seg?host=a,b&port=5432,5433&target_session_attrs=read-write&sslmode=require")
    from yoyo.connections import parse_uri

    parsed = parse_uri(yoyo_url("postgres://u@[::1]:6000,b/seg"))  # as yoyo hands them to libpq
    assert (parsed.hostname, parsed.port, parsed.args) == (None, None, {"host": "::1,b", "port": "6000,5432"})
