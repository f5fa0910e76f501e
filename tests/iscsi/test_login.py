"""Login negotiation and CHAP (RFC 7143 6, 11.12-11.13, 12.1.3, 13)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtl.iscsi.errors import LoginStatus
from vtl.iscsi.login import LoginMachine, SessionType, chap_response
from vtl.iscsi.pdu import LoginRequest, LoginResponse
from vtl.iscsi.target import ChapCredentials, TargetAuth
from vtl.iscsi.text import decode_binary, decode_text, encode_text

from tests.iscsi.helpers import INITIATOR, ISID, TARGET, counting_bytes, make_registry

BASE = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")]
CHAP = TargetAuth(chap=ChapCredentials("alice", b"alicesecret12"),
                  mutual=ChapCredentials("target", b"targetsecret"))


class Driver:
    def __init__(self, auth: TargetAuth | None = None, **kw: object) -> None:
        self.m = LoginMachine(make_registry(auth), tsih=42, random_bytes=counting_bytes, **kw)
        self.cmdsn = 7

    def send(self, keys: list[tuple[str, str]], *, csg: int, nsg: int = 0, transit: bool = False,
             cont: bool = False, raw: bytes | None = None) -> tuple[LoginResponse, dict[str, str]]:
        data = raw if raw is not None else encode_text(keys)
        rsp = self.m.receive(LoginRequest(transit=transit, cont=cont, csg=csg, nsg=nsg,
                                          isid=ISID, itt=1, cmdsn=self.cmdsn, expstatsn=0,
                                          data=data))
        return rsp, dict(decode_text(rsp.data))


def test_plain_login_negotiates_streaming_defaults() -> None:
    d = Driver()
    offered = BASE + [
        ("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"), ("InitialR2T", "No"),
        ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "65536"), ("MaxRecvDataSegmentLength", "131072"),
        ("MaxOutstandingR2T", "8"), ("ErrorRecoveryLevel", "2"), ("MaxConnections", "4"),
        ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "20"), ("IFMarker", "No"),
        ("OFMarker", "No"), ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"),
        ("X-com.example.Foo", "1"), ("X#org.example", "y"), ("Bogus", "1")]
    rsp, keys = d.send(offered, csg=1, nsg=3, transit=True)
    assert rsp.status == 0 and rsp.transit and rsp.nsg == 3 and rsp.tsih == 42
    assert rsp.expcmdsn == 7 and rsp.maxcmdsn - rsp.expcmdsn + 1 >= 32
    assert keys["HeaderDigest"] == "CRC32C" and keys["DataDigest"] == "None"
    assert keys["MaxBurstLength"] == "1048576" and keys["FirstBurstLength"] == "65536"
    assert keys["InitialR2T"] == "No" and keys["ImmediateData"] == "Yes"
    assert keys["MaxRecvDataSegmentLength"] == "262144"
    assert keys["ErrorRecoveryLevel"] == "0" and keys["MaxConnections"] == "1"
    assert keys["MaxOutstandingR2T"] == "8"
    assert keys["X-com.example.Foo"] == "NotUnderstood" and keys["Bogus"] == "NotUnderstood"
    assert keys["X#org.example"] == "NotUnderstood"
    assert keys["TargetPortalGroupTag"] == "1" and keys["TargetAlias"] == "disk"
    p = d.m.params
    assert p.header_digest and not p.data_digest
    assert p.max_send_data_segment_length == 131072 and p.max_burst_length == 1048576
    assert d.m.done and d.m.session_type is SessionType.NORMAL


def test_boolean_functions_and_bad_values() -> None:
    d = Driver()
    _, keys = d.send(BASE + [("InitialR2T", "Yes"), ("ImmediateData", "No"),
                             ("MaxBurstLength", "12"), ("IFMarker", "Maybe")],
                     csg=1, nsg=3, transit=True)
    assert keys["InitialR2T"] == "Yes" and keys["ImmediateData"] == "No"
    assert keys["MaxBurstLength"] == "Reject" and keys["IFMarker"] == "Reject"
    assert d.m.params.initial_r2t and not d.m.params.immediate_data


def test_security_then_operational_stages() -> None:
    d = Driver()
    rsp, keys = d.send(BASE + [("AuthMethod", "None")], csg=0, nsg=1, transit=True)
    assert rsp.status == 0 and rsp.transit and rsp.nsg == 1 and keys["AuthMethod"] == "None"
    assert rsp.tsih == 0
    rsp, keys = d.send([("MaxRecvDataSegmentLength", "8192")], csg=1, nsg=3, transit=True)
    assert rsp.transit and rsp.tsih == 42 and d.m.done
    assert rsp.statsn == 1


def test_continuation_pdus() -> None:
    d = Driver()
    text = encode_text(BASE + [("AuthMethod", "None")])
    rsp, keys = d.send([], csg=0, raw=text[:20], cont=True)
    assert rsp.status == 0 and not rsp.transit and keys == {}
    rsp, keys = d.send([], csg=0, nsg=3, transit=True, raw=text[20:])
    assert rsp.status == 0 and keys["AuthMethod"] == "None" and d.m.done


@pytest.mark.parametrize("keys, status", [
    ([("TargetName", TARGET)], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR)], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR), ("TargetName", "iqn.nope:x")], LoginStatus.NOT_FOUND),
    ([("InitiatorName", INITIATOR), ("SessionType", "Weird")],
     LoginStatus.SESSION_TYPE_NOT_SUPPORTED),
])
def test_login_failures(keys: list[tuple[str, str]], status: LoginStatus) -> None:
    d = Driver()
    rsp, _ = d.send(keys, csg=1, nsg=3, transit=True)
    assert rsp.status == status and d.m.failed and not rsp.transit
    again, _ = d.send(keys, csg=1, nsg=3, transit=True)
    assert again.status != 0


def test_acl_refuses_other_initiators() -> None:
    d = Driver(TargetAuth(allowed_initiators=frozenset({"iqn.other:host"})))
    rsp, _ = d.send(BASE, csg=1, nsg=3, transit=True)
    assert rsp.status == LoginStatus.AUTHORIZATION_FAILURE


def test_unsupported_version_and_bad_text() -> None:
    d = Driver()
    rsp = d.m.receive(LoginRequest(transit=True, csg=1, nsg=3, version_min=1, isid=ISID,
                                   data=encode_text(BASE)))
    assert rsp.status == LoginStatus.UNSUPPORTED_VERSION
    d = Driver()
    rsp, _ = d.send([], csg=1, nsg=3, transit=True, raw=b"garbage-without-equals\0")
    assert rsp.status == LoginStatus.INITIATOR_ERROR


def test_discovery_session_uses_discovery_auth() -> None:
    d = Driver()
    rsp, keys = d.send([("InitiatorName", INITIATOR), ("SessionType", "Discovery")],
                       csg=1, nsg=3, transit=True)
    assert rsp.status == 0 and d.m.session_type is SessionType.DISCOVERY
    assert "TargetPortalGroupTag" not in keys


def _chap_to_challenge(d: Driver) -> tuple[int, bytes]:
    rsp, keys = d.send(BASE + [("AuthMethod", "CHAP,None")], csg=0, nsg=1, transit=True)
    assert rsp.status == 0 and keys["AuthMethod"] == "CHAP" and not rsp.transit
    rsp, keys = d.send([("CHAP_A", "7,5")], csg=0, nsg=1, transit=True)
    assert keys["CHAP_A"] == "5" and not rsp.transit
    return int(keys["CHAP_I"]), decode_binary(keys["CHAP_C"])


def test_chap_one_way_good() -> None:
    d = Driver(CHAP)
    ident, challenge = _chap_to_challenge(d)
    r = hashlib.md5(bytes([ident]) + b"alicesecret12" + challenge).digest()
    rsp, keys = d.send([("CHAP_N", "alice"), ("CHAP_R", "0x" + r.hex())], csg=0, nsg=1,
                       transit=True)
    assert rsp.status == 0 and rsp.transit and rsp.nsg == 1 and keys == {}
    rsp, _ = d.send([], csg=1, nsg=3, transit=True)
    assert rsp.status == 0 and d.m.done


def test_chap_base64_response() -> None:
    d = Driver(CHAP)
    ident, challenge = _chap_to_challenge(d)
    r = chap_response(ident, b"alicesecret12", challenge)
    rsp, _ = d.send([("CHAP_N", "alice"), ("CHAP_R", "0b" + base64.b64encode(r).decode())],
                    csg=0, nsg=3, transit=True)
    assert rsp.status == 0 and d.m.done


@pytest.mark.parametrize("name, secret", [("alice", b"wrongsecret1"), ("mallory", b"alicesecret12")])
def test_chap_bad_secret_or_name(name: str, secret: bytes) -> None:
    d = Driver(CHAP)
    ident, challenge = _chap_to_challenge(d)
    r = chap_response(ident, secret, challenge)
    rsp, _ = d.send([("CHAP_N", name), ("CHAP_R", "0x" + r.hex())], csg=0, nsg=1, transit=True)
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE and d.m.failed


def test_chap_required_but_initiator_offers_none() -> None:
    d = Driver(CHAP)
    rsp, _ = d.send(BASE + [("AuthMethod", "None")], csg=0, nsg=1, transit=True)
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE
    d = Driver(CHAP)
    rsp, _ = d.send(BASE, csg=1, nsg=3, transit=True)  # skipping security entirely
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE


def test_chap_mutual_good() -> None:
    d = Driver(CHAP)
    ident, challenge = _chap_to_challenge(d)
    r = chap_response(ident, b"alicesecret12", challenge)
    my_challenge = bytes(range(100, 116))
    rsp, keys = d.send([("CHAP_N", "alice"), ("CHAP_R", "0x" + r.hex()), ("CHAP_I", "77"),
                        ("CHAP_C", "0x" + my_challenge.hex())], csg=0, nsg=1, transit=True)
    assert rsp.status == 0 and rsp.transit
    assert keys["CHAP_N"] == "target"
    assert decode_binary(keys["CHAP_R"]) == chap_response(77, b"targetsecret", my_challenge)


def test_chap_reflected_challenge_is_refused() -> None:
    d = Driver(CHAP)
    ident, challenge = _chap_to_challenge(d)
    r = chap_response(ident, b"alicesecret12", challenge)
    rsp, _ = d.send([("CHAP_N", "alice"), ("CHAP_R", "0x" + r.hex()), ("CHAP_I", str(ident)),
                     ("CHAP_C", "0x" + challenge.hex())], csg=0, nsg=1, transit=True)
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE


def test_mutual_requested_but_not_configured() -> None:
    d = Driver(TargetAuth(chap=ChapCredentials("alice", b"alicesecret12")))
    ident, challenge = _chap_to_challenge(d)
    r = chap_response(ident, b"alicesecret12", challenge)
    rsp, _ = d.send([("CHAP_N", "alice"), ("CHAP_R", "0x" + r.hex()), ("CHAP_I", "1"),
                     ("CHAP_C", "0x" + bytes(16).hex())], csg=0, nsg=1, transit=True)
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE


def test_chap_without_md5_fails() -> None:
    d = Driver(CHAP)
    d.send(BASE + [("AuthMethod", "CHAP")], csg=0, nsg=1, transit=True)
    rsp, _ = d.send([("CHAP_A", "7")], csg=0, nsg=1, transit=True)
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE


def test_bad_stage_transition() -> None:
    d = Driver()
    rsp, _ = d.send(BASE, csg=1, nsg=0, transit=True)
    assert rsp.status == LoginStatus.INITIATOR_ERROR


def test_discovery_chap_from_registry() -> None:
    reg = make_registry()
    reg.discovery_auth = TargetAuth(chap=ChapCredentials("disc", b"discoverysecret"))
    m = LoginMachine(reg, tsih=1, random_bytes=counting_bytes)
    disc = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]
    rsp = m.receive(LoginRequest(transit=True, csg=1, nsg=3, isid=ISID,
                                 data=encode_text(disc)))
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE
    m = LoginMachine(reg, tsih=1, random_bytes=counting_bytes)
    rsp = m.receive(LoginRequest(csg=0, nsg=1, transit=True, isid=ISID,
                                 data=encode_text(disc + [("AuthMethod", "CHAP")])))
    rsp = m.receive(LoginRequest(csg=0, nsg=1, transit=True, isid=ISID,
                                 data=encode_text([("CHAP_A", "5")])))
    keys = dict(decode_text(rsp.data))
    r = chap_response(int(keys["CHAP_I"]), b"discoverysecret", decode_binary(keys["CHAP_C"]))
    rsp = m.receive(LoginRequest(csg=0, nsg=3, transit=True, isid=ISID, data=encode_text(
        [("CHAP_N", "disc"), ("CHAP_R", "0x" + r.hex())])))
    assert rsp.status == 0 and m.done and m.session_type is SessionType.DISCOVERY


_KEYS = ["InitiatorName", "TargetName", "SessionType", "AuthMethod", "CHAP_A", "CHAP_I",
         "CHAP_C", "CHAP_N", "CHAP_R", "HeaderDigest", "MaxBurstLength", "InitialR2T",
         "TargetPortalGroupTag", "X-foo", "MaxRecvDataSegmentLength", "ErrorRecoveryLevel"]
_VALUES = ["", "None", "CHAP", "CHAP,None", "5", "0x00", "0bAAAA", "Yes", "No", "1", "0",
           "99999999999", "Normal", "Discovery", INITIATOR, TARGET, "alice", "0x" + "ab" * 16]


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 3), st.integers(0, 3),
                          st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)),
                                   max_size=6)), max_size=6),
       st.booleans())
@settings(max_examples=300, deadline=None)
def test_fuzz_login_sequences(steps: list, with_chap: bool) -> None:
    m = LoginMachine(make_registry(CHAP if with_chap else None), tsih=3,
                     random_bytes=counting_bytes)
    for transit, cont, csg, nsg, keys in steps:
        rsp = m.receive(LoginRequest(transit=transit, cont=cont, csg=csg, nsg=nsg, isid=ISID,
                                     data=encode_text(keys)))
        assert isinstance(rsp, LoginResponse)
        assert (rsp.status != 0) == m.failed
        if m.done:
            assert rsp.transit and rsp.nsg == 3 and rsp.tsih == 3
            assert not with_chap or m._auth_done
        if m.failed or m.done:
            break
