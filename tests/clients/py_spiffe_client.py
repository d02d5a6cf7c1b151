"""A SPIFFE workload using py-spiffe (gRPC C-core) against latch-proxy's Workload API.

Run by tests/tests/workload_api_clients.rs with SPIFFE_ENDPOINT_SOCKET set, as the uid under
test. Prints one JSON object on stdout: what the library fetched, or the error it raised.

    python py_spiffe_client.py fetch ROTATION_WAIT_SECONDS
    python py_spiffe_client.py refused
    python py_spiffe_client.py jwt REFUSED_TOKENS_JSON
"""

import json
import sys
import threading

from spiffe import WorkloadApiClient


def serial(svid):
    return format(svid.leaf.serial_number, "x")


def fetch(client, rotation_wait):
    svid = client.fetch_x509_svid(timeout=10)
    key = svid.private_key.public_key().public_numbers()
    result = {
        "spiffe_id": str(svid.spiffe_id),
        "serial": serial(svid),
        "key_matches_leaf": key == svid.leaf.public_key().public_numbers(),
        "chain_length": len(svid.cert_chain),
    }
    bundles = client.fetch_x509_bundles(timeout=10)
    result["bundles"] = {
        str(b.trust_domain): len(b.x509_authorities) for b in bundles.bundles
    }

    # The stream delivers the current SVID, then the next one after the proxy rotates.
    serials, errors = [], []
    done = threading.Event()

    def on_success(context):
        s = serial(context.default_svid)
        if s not in serials:
            serials.append(s)
        if len(serials) >= 2:
            done.set()

    def on_error(error):
        errors.append(f"{type(error).__name__}: {error}")
        done.set()

    handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    done.wait(rotation_wait)
    handle.cancel()
    result["stream_serials"] = serials
    result["stream_errors"] = errors
    return result


def jwt_svids(client, refused_tokens_path):
    """JWT bundles, a JWT-SVID for two audiences, its validation by the proxy and by PyJWT with
    the bundle's keys, and the proxy's verdict on tokens that must be refused."""
    import jwt as pyjwt

    bundles = client.fetch_jwt_bundles(timeout=10)
    result = {
        "bundles": {
            str(b.trust_domain): sorted(b.jwt_authorities.keys()) for b in bundles.bundles
        }
    }
    svid = client.fetch_jwt_svid({"db", "cache"}, timeout=10)
    again = client.fetch_jwt_svid({"cache", "db"}, timeout=10)
    result["svid"] = {
        "spiffe_id": str(svid.spiffe_id),
        "audience": sorted(svid.audience),
        "expiry": svid.expiry,
        "cached": again.token == svid.token,
    }
    validated = client.validate_jwt_svid(svid.token, "db", timeout=10)
    result["validated"] = str(validated.spiffe_id)

    # Independently of Latch: PyJWT with the key the bundle (as py-spiffe parsed it) holds
    # for the token's kid.
    kid = pyjwt.get_unverified_header(svid.token)["kid"]
    bundle = next(iter(bundles.bundles))
    key = bundle.get_jwt_authority(kid)
    try:
        claims = pyjwt.decode(
            svid.token,
            key,
            algorithms=["ES256"],
            audience="cache",
            options={"require": ["exp", "sub", "aud", "iat"]},
        )
        result["pyjwt"] = {"claims": claims}
    except pyjwt.PyJWTError as error:
        result["pyjwt"] = {"error": f"{type(error).__name__}: {error}"}

    refused = {"other_audience": (svid.token, "other")}
    with open(refused_tokens_path) as f:
        for name, token in json.load(f).items():
            refused[name] = (token, "db")
    result["refused"] = {}
    for name, (token, audience) in refused.items():
        try:
            client.validate_jwt_svid(token, audience, timeout=10)
            result["refused"][name] = None
        except Exception as error:  # what the app would see
            result["refused"][name] = f"{type(error).__name__}: {error}"
    return result


def main():
    mode = sys.argv[1]
    client = WorkloadApiClient()  # from SPIFFE_ENDPOINT_SOCKET, as an injected app does
    try:
        if mode == "fetch":
            result = fetch(client, float(sys.argv[2]))
        elif mode == "jwt":
            result = jwt_svids(client, sys.argv[2])
        else:
            try:
                client.fetch_x509_svid(timeout=5)
                result = {"error": None}
            except Exception as error:  # what the app would see
                result = {"error": f"{type(error).__name__}: {error}"}
    finally:
        client.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
