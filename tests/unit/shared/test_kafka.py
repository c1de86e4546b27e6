"""Kafka security and secrets: the settings users know, mapped to every client in one place, with
clear errors that never show a secret."""

from __future__ import annotations

import ssl

import pytest
import trustme
from pydantic import ValidationError

from shared.kafka import kafka_options, producer_options
from shared.settings import Settings, explain


def settings(**values) -> Settings:
    return Settings(_env_file=None, kafka_bootstrap_servers="broker:9093", **values)


def test_plaintext_by_default():
    assert kafka_options(settings()) == {"bootstrap_servers": "broker:9093", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_maps_to_every_client_option(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    options = kafka_options(settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                                     kafka_sasl_username="segments", kafka_sasl_password="pw",
                                     kafka_ssl_ca_file=ca_file))
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert options == {"bootstrap_servers": "broker:9093", "security_protocol": "SASL_SSL",
                       "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "segments",
                       "sasl_plain_password": "pw"}


def test_producers_get_the_same_connection_options():
    base = settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p")
    assert kafka_options(base).items() <= producer_options(base).items()


def test_mutual_tls_presents_the_client_certificate(tmp_path):
    ca = trustme.CA()
    client = ca.issue_cert("segmentation-client")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["cert"])
    client.private_key_pem.write_to_path(paths["key"])
    options = kafka_options(settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=paths["ca"],
                                     kafka_ssl_cert_file=paths["cert"], kafka_ssl_key_file=paths["key"]))
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_every_secret_can_come_from_a_file(tmp_path):
    for name, value in [("kafka_sasl_password", "from-a-file"), ("report_signing_secret", "signing-secret"),
                        ("database_url", "postgresql://u:p@db/segments")]:
        path = tmp_path / name
        path.write_text(value + "\n")  # the trailing newline of `echo` or a mounted secret is dropped
        loaded = Settings(_env_file=None, **{f"{name}_file": path})
        secret = getattr(loaded, name)
        assert (secret if isinstance(secret, str) else secret.get_secret_value()) == value
        assert loaded.to_env()[name.upper()] == value  # a child process gets the value itself


@pytest.mark.parametrize(("values", "says"), [
    ({"kafka_sasl_password_file": "/no/such/file"}, "KAFKA_SASL_PASSWORD_FILE=/no/such/file: cannot read it"),
    ({"kafka_sasl_password": "pw", "kafka_sasl_password_file": "/etc/hostname"},
     "set KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE, not both"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"}, "needs KAFKA_SASL_USERNAME and"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/no/ca.pem"}, "KAFKA_SSL_CA_FILE=/no/ca.pem: no such"),
    ({"kafka_ssl_cert_file": "/etc/hostname"}, "mutual TLS needs both"),
])
def test_bad_settings_say_which_variable_and_why(values, says):
    with pytest.raises(ValidationError) as raised:
        settings(**values)
    assert says in explain(raised.value)


def test_a_secret_is_never_shown(tmp_path, capsys):
    password, url = "hunter2-kafka", "postgresql://app:hunter2-db@db/segments"
    loaded = settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password=password,
                      database_url=url, report_signing_secret="hunter2-links")
    shown = repr(loaded) + str(loaded)
    assert password not in shown and "hunter2-links" not in shown and "hunter2-db" not in shown
    with pytest.raises(ValidationError) as raised:  # an error about a setting never echoes values
        settings(kafka_security_protocol="SASL_SSL", kafka_sasl_password=password, database_url=url)
    assert password not in explain(raised.value) and "hunter2-db" not in explain(raised.value)
