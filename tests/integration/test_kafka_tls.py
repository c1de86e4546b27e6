"""Kafka over TLS, for real: a broker behind a TLS-terminating proxy that it advertises, with a CA
and certificates made here. The whole pipeline runs over it (produce through POST /commands,
provision, consume, publish outcomes, read them back, read the state); a certificate that is not
trusted or has expired fails at once and says so."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import trustme
from pydantic import SecretStr

from devstack.embedded import EmbeddedKafka
from devstack.processes import free_port
from services.command_consumer.bootstrap import build_consumer
from services.query_api.app import create_app
from shared.client import OutcomeReader
from shared.kafka import KafkaSetupError, ensure_topics
from tests.proxies import TcpProxy
from tests.support import service_env, wait_for_outcomes

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("TEST_INFRA")),
                                 reason="starts an embedded broker of its own behind a TLS proxy")]


@contextlib.asynccontextmanager
async def broker_behind_tls(certificate: trustme.LeafCert, client_ca: trustme.CA | None = None):
    """A broker that advertises localhost:<proxy port>; the proxy presents `certificate` and, with
    `client_ca`, asks clients for a certificate that CA signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    if client_ca:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    proxy_port = free_port()
    kafka = EmbeddedKafka(advertised=f"localhost:{proxy_port}")
    proxy = TcpProxy(kafka.port, context)
    await proxy.start(proxy_port)
    try:
        await asyncio.to_thread(kafka.start)
        yield f"localhost:{proxy_port}"
    finally:
        await proxy.stop()
        await asyncio.to_thread(kafka.stop)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(path)
    return path


async def test_the_whole_pipeline_runs_over_tls(settings, pool, ca, ca_file):
    async with broker_behind_tls(ca.issue_cert("localhost")) as address:
        tls = settings.model_copy(update={"kafka_bootstrap_servers": address, "kafka_security_protocol": "SSL",
                                          "kafka_ssl_ca_file": ca_file})
        assert set(await ensure_topics(tls)) >= set(tls.command_topics)  # the admin client, over TLS
        app = create_app(tls)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as api, \
                OutcomeReader(tls) as outcomes:
            consumer = build_consumer(tls, pool)
            consuming = asyncio.create_task(consumer.run())
            try:
                for command in ({"type": "create_segment", "slug": "TLS", "command_id": "s"},
                                {"type": "update_user_segments", "user_id": 7, "add": ["TLS"], "command_id": "u"}):
                    assert (await api.post("/commands", json=command)).status_code == 202
                    await wait_for_outcomes(pool, [command["command_id"]])
                published = await outcomes.wait_for(["s", "u"], timeout=20)  # the results topic, over TLS
            finally:
                consumer.stop()
                await consuming
            assert {key: value["status"] for key, value in published.items()} == {"s": "applied", "u": "applied"}
            segments = (await api.get("/users/7/segments")).json()["segments"]
            assert [segment["slug"] for segment in segments] == ["TLS"]
            assert (await api.get("/readyz")).json()["checks"]["kafka"] == "ok"


async def test_mutual_tls_presents_the_client_certificate(settings, ca, ca_file, tmp_path):
    client = ca.issue_cert("segmentation-client")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(cert)
    client.private_key_pem.write_to_path(key)
    async with broker_behind_tls(ca.issue_cert("localhost"), client_ca=ca) as address:
        mutual = settings.model_copy(update={"kafka_bootstrap_servers": address, "kafka_security_protocol": "SSL",
                                             "kafka_ssl_ca_file": ca_file, "kafka_ssl_cert_file": cert,
                                             "kafka_ssl_key_file": key})
        assert set(await ensure_topics(mutual)) >= set(mutual.command_topics)


@pytest.mark.parametrize(("issue", "says"), [
    (lambda ca: trustme.CA().issue_cert("localhost"), "not trusted (certificate verify failed"),
    (lambda ca: ca.issue_cert("localhost", not_after=datetime.now(UTC) - timedelta(days=1)), "expired"),
    (lambda ca: ca.issue_cert("kafka.example.com"), "Hostname mismatch"),
])
async def test_a_certificate_that_cannot_be_trusted_fails_fast_and_says_why(settings, ca, ca_file, issue, says):
    async with broker_behind_tls(issue(ca)) as address:
        tls = settings.model_copy(update={"kafka_bootstrap_servers": address, "kafka_security_protocol": "SSL",
                                          "kafka_ssl_ca_file": ca_file})
        started = asyncio.get_running_loop().time()
        with pytest.raises(KafkaSetupError, match=re.escape(says)) as raised:
            await ensure_topics(tls)
        assert asyncio.get_running_loop().time() - started < 15  # no retry loop
        assert "KAFKA_SSL_CA_FILE" in str(raised.value)


async def test_sasl_the_broker_refuses_fails_fast_and_says_so(settings, ca, ca_file):
    """The embedded broker offers no SASL (its --authentication cannot provision a first user), so
    every SASL login is refused: the refusal reaches the user at once, in words."""
    async with broker_behind_tls(ca.issue_cert("localhost")) as address:
        sasl = settings.model_copy(update={
            "kafka_bootstrap_servers": address, "kafka_security_protocol": "SASL_SSL", "kafka_ssl_ca_file": ca_file,
            "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "segments",
            "kafka_sasl_password": SecretStr("not-the-password")})
        with pytest.raises(KafkaSetupError, match="refused SASL SCRAM-SHA-512 for user 'segments'") as raised:
            await ensure_topics(sasl)
        assert "not-the-password" not in str(raised.value)


async def test_services_refuse_to_start_on_an_untrusted_broker_and_show_no_secret(settings, ca_file):
    """The consumer exits with code 2 and the API does not start; their output names the problem
    and never the SASL password or the database password."""
    async with broker_behind_tls(trustme.CA().issue_cert("localhost")) as address:
        env = service_env(settings, KAFKA_BOOTSTRAP_SERVERS=address, KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                          KAFKA_SSL_CA_FILE=str(ca_file), KAFKA_SASL_USERNAME="segments",
                          KAFKA_SASL_PASSWORD="hunter2-kafka", CONSUMER_METRICS_PORT="0", API_PORT=str(free_port()))
        for service in ("command_consumer", "query_api"):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"services.{service}", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
            assert process.returncode == (2 if service == "command_consumer" else 3), output
            assert "certificate verify failed" in output, output
            assert "hunter2" not in output
