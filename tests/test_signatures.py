from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import standardwebhooks

from cxrelay.core.errors import SignatureError
from cxrelay.core.signatures import (
    HmacVerifier,
    OpenMessagingVerifier,
    StandardWebhooksVerifier,
    StaticCredentialVerifier,
    split_secrets,
)

BODY = b'{"id":"e1","conversation":{"id":"c1"}}'


def digest(secret: str, body: bytes = BODY) -> bytes:
    return hmac.new(secret.encode(), body, hashlib.sha256).digest()


class TestHmac:
    verifier = HmacVerifier(["current", "previous"])

    @pytest.mark.parametrize("value", [
        digest("current").hex(),
        "sha256=" + digest("current").hex(),
        "SHA256=" + digest("current").hex().upper(),
        base64.b64encode(digest("current")).decode(),
        "sha256=" + base64.b64encode(digest("current")).decode(),
    ])
    def test_accepts_hex_and_base64_with_or_without_prefix(self, value: str) -> None:
        self.verifier.verify(BODY, {"X-Signature": value})

    def test_rotated_secret_is_accepted(self) -> None:
        self.verifier.verify(BODY, {"x-signature": digest("previous").hex()})

    def test_missing_header(self) -> None:
        with pytest.raises(SignatureError, match="missing X-Signature"):
            self.verifier.verify(BODY, {})

    def test_wrong_secret(self) -> None:
        with pytest.raises(SignatureError, match="does not match"):
            self.verifier.verify(BODY, {"X-Signature": digest("other").hex()})

    def test_tampered_body(self) -> None:
        with pytest.raises(SignatureError):
            self.verifier.verify(BODY + b" ", {"X-Signature": digest("current").hex()})

    @pytest.mark.parametrize("value", ["", "sha256=", "not base64 !!", "zz" * 32, "sha256=%%%"])
    def test_malformed_signature_raises_the_same_error(self, value: str) -> None:
        with pytest.raises(SignatureError):
            self.verifier.verify(BODY, {"X-Signature": value})

    def test_sign_round_trips(self) -> None:
        self.verifier.verify(BODY, self.verifier.sign(BODY))

    def test_split_secrets_one_per_line_or_a_json_list(self) -> None:
        assert split_secrets(" new \n\n old\n") == ["new", "old"]
        assert split_secrets('["new", "old,with,commas", " "]') == ["new", "old,with,commas"]
        assert split_secrets("[not json") == ["[not json"]

    def test_a_secret_with_commas_is_one_secret(self) -> None:
        (secret,) = split_secrets("abc,def,ghi")
        verifier = HmacVerifier(split_secrets("abc,def,ghi"))
        verifier.verify(BODY, HmacVerifier([secret]).sign(BODY))
        for part in ("abc", "def", "ghi"):  # its pieces are not secrets of their own
            with pytest.raises(SignatureError):
                verifier.verify(BODY, HmacVerifier([part]).sign(BODY))


class TestOpenMessaging:
    def test_accepts_genesys_format(self) -> None:
        header = "sha256=" + base64.b64encode(digest("om")).decode()
        OpenMessagingVerifier(["om"]).verify(BODY, {"X-Hub-Signature-256": header})

    def test_requires_prefix(self) -> None:
        with pytest.raises(SignatureError, match="sha256="):
            OpenMessagingVerifier(["om"]).verify(
                BODY, {"X-Hub-Signature-256": base64.b64encode(digest("om")).decode()})

    def test_wrong_secret(self) -> None:
        header = "sha256=" + base64.b64encode(digest("x")).decode()
        with pytest.raises(SignatureError):
            OpenMessagingVerifier(["om"]).verify(BODY, {"X-Hub-Signature-256": header})


class TestStandardWebhooks:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    now = 1_800_000_000

    def verifier(self, *secrets: str) -> StandardWebhooksVerifier:
        return StandardWebhooksVerifier(list(secrets) or [self.secret], clock=lambda: self.now)

    def reference_headers(self, timestamp: int | None = None) -> dict[str, str]:
        from datetime import datetime, timezone

        ts = datetime.fromtimestamp(timestamp or self.now, tz=timezone.utc)
        signature = standardwebhooks.Webhook(self.secret).sign("msg_1", ts, BODY.decode())
        return {"webhook-id": "msg_1", "webhook-timestamp": str(int(ts.timestamp())),
                "webhook-signature": signature}

    def test_verifies_what_the_reference_library_signs(self) -> None:
        self.verifier().verify(BODY, self.reference_headers())

    def test_reference_library_verifies_what_we_sign(self) -> None:
        import time

        headers = StandardWebhooksVerifier([self.secret]).sign(BODY, msg_id="msg_2",
                                                               timestamp=int(time.time()))
        standardwebhooks.Webhook(self.secret).verify(BODY.decode(), headers)

    def test_old_timestamp(self) -> None:
        with pytest.raises(SignatureError, match="too old"):
            self.verifier().verify(BODY, self.reference_headers(self.now - 301))

    def test_future_timestamp(self) -> None:
        with pytest.raises(SignatureError, match="future"):
            self.verifier().verify(BODY, self.reference_headers(self.now + 301))

    def test_several_signatures_one_valid(self) -> None:
        headers = self.reference_headers()
        headers["webhook-signature"] = "v1,AAAA v2,whatever " + headers["webhook-signature"]
        self.verifier().verify(BODY, headers)

    def test_rotated_secrets(self) -> None:
        other = "whsec_" + base64.b64encode(b"another-secret-another-secret!!").decode()
        self.verifier(other, self.secret).verify(BODY, self.reference_headers())

    def test_secret_without_prefix(self) -> None:
        self.verifier(self.secret.removeprefix("whsec_")).verify(BODY, self.reference_headers())

    def test_wrong_signature(self) -> None:
        headers = self.reference_headers()
        headers["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
        with pytest.raises(SignatureError, match="no webhook-signature"):
            self.verifier().verify(BODY, headers)

    def test_missing_and_malformed_headers(self) -> None:
        with pytest.raises(SignatureError, match="webhook-id"):
            self.verifier().verify(BODY, {})
        headers = self.reference_headers()
        headers["webhook-timestamp"] = "yesterday"
        with pytest.raises(SignatureError, match="integer"):
            self.verifier().verify(BODY, headers)

    def test_bad_secret_is_a_config_error(self) -> None:
        with pytest.raises(ValueError, match="whsec_"):
            StandardWebhooksVerifier(["whsec_***"])


class TestStatic:
    def test_bearer(self) -> None:
        verifier = StaticCredentialVerifier(["tok-1", "tok-2"])
        verifier.verify(BODY, {"Authorization": "Bearer tok-2"})
        verifier.verify(BODY, {"Authorization": "bearer tok-1"})
        with pytest.raises(SignatureError):
            verifier.verify(BODY, {"Authorization": "Bearer tok-3"})
        with pytest.raises(SignatureError, match="missing"):
            verifier.verify(BODY, {})

    def test_basic(self) -> None:
        verifier = StaticCredentialVerifier(["user:pass"], kind="basic")
        verifier.verify(BODY, verifier.sign(BODY))
        with pytest.raises(SignatureError):
            verifier.verify(BODY, {"Authorization": "Basic " + base64.b64encode(b"u:x").decode()})

    def test_named_header(self) -> None:
        verifier = StaticCredentialVerifier(["k"], kind="header", header="X-Api-Key")
        verifier.verify(BODY, {"X-Api-Key": "k"})
        with pytest.raises(SignatureError):
            verifier.verify(BODY, {"X-Api-Key": "K"})
