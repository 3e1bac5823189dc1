#!/usr/bin/env bash
# make-certs.sh — a TEST certificate authority and the certificates a Ringcast fleet on
# Mosquitto needs: the broker's server certificate, the controller's client certificate and
# one client certificate per device whose Common Name is the device id (Mosquitto's
# `use_identity_as_username true` turns the CN into the MQTT username that the ACL's %u
# matches).
#
#   deploy/make-certs.sh OUT_DIR [DEVICE_ID...]
#
# Writes (keys are mode 0600, everything else 0644):
#   OUT_DIR/ca.crt  ca.key                  the test CA (keep ca.key offline in real use)
#   OUT_DIR/server.crt  server.key          the broker (SAN: localhost, 127.0.0.1, ::1, extras)
#   OUT_DIR/controller.crt  controller.key  CN=ringcast-controller
#   OUT_DIR/observer.crt  observer.key      CN=ringcast-observer (read-only monitoring)
#   OUT_DIR/devices/ID.crt  devices/ID.key  CN=ID, one pair per device id
#
# Running it again reuses an existing CA and existing certificates, so devices can be added
# later with the same CA: `make-certs.sh OUT_DIR new-device-7`.
#
# Environment:
#   RINGCAST_BROKER_NAMES  extra server names, comma separated, e.g. "mqtt.example.com,10.0.0.5"
#   RINGCAST_CERT_DAYS     validity of leaf certificates in days (default 825)
#   RINGCAST_CA_DAYS       validity of the CA in days (default 3650)
#   RINGCAST_CONTROLLER_CN the controller's CN (default ringcast-controller; the ACL names it)
#   RINGCAST_OBSERVER_CN   the read-only observer's CN (default ringcast-observer; ditto)
#
# Keys are ECDSA P-256: every TLS stack in the path (OpenSSL in Mosquitto, rustls with ring in
# the agent and controller) supports it, and it is fast on small devices.
# For production use your own PKI (an offline or HSM-held CA, short-lived device certificates
# issued at manufacturing or enrolment); this script is for tests, labs and demos.
set -euo pipefail

usage() {
  echo "usage: $0 OUT_DIR [DEVICE_ID...]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
out=$1
shift

command -v openssl >/dev/null 2>&1 || {
  echo "make-certs: openssl not found (apt-get install openssl)" >&2
  exit 1
}

cert_days=${RINGCAST_CERT_DAYS:-825}
ca_days=${RINGCAST_CA_DAYS:-3650}
controller_cn=${RINGCAST_CONTROLLER_CN:-ringcast-controller}
observer_cn=${RINGCAST_OBSERVER_CN:-ringcast-observer}

# Same rule as ringcast-proto's `check_name`: a device id becomes a topic segment through the
# ACL's %u, so it must never carry '/', '+', '#' or anything else a topic would interpret.
valid_name() {
  local n=$1
  [ -n "$n" ] && [ ${#n} -le 128 ] && [ "$n" != "." ] && [ "$n" != ".." ] &&
    [[ "$n" =~ ^[A-Za-z0-9._-]+$ ]]
}

for id in "$controller_cn" "$observer_cn" "$@"; do
  valid_name "$id" || {
    echo "make-certs: invalid name '$id': use 1-128 of A-Z a-z 0-9 . _ -" >&2
    exit 2
  }
done
for id in "$@"; do
  if [ "$id" = "$controller_cn" ] || [ "$id" = "$observer_cn" ]; then
    echo "make-certs: a device may not be called '$id' (the ACL grants that CN more rights)" >&2
    exit 2
  fi
done

umask 077
mkdir -p "$out/devices"
tmp=$(mktemp -d "$out/.make-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# A private key, written to a temporary name first so an interrupted run never leaves a
# half-written key that a later run would reuse.
new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/key.pem" 2>/dev/null
  chmod 600 "$tmp/key.pem"
  mv "$tmp/key.pem" "$1"
}

if [ ! -s "$out/ca.crt" ] || [ ! -s "$out/ca.key" ]; then
  new_key "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$ca_days" \
    -subj "/O=Ringcast/CN=Ringcast test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$tmp/ca.crt"
  chmod 644 "$tmp/ca.crt"
  mv "$tmp/ca.crt" "$out/ca.crt"
  echo "make-certs: created CA $out/ca.crt"
fi

# issue NAME CN EKU SAN: a leaf certificate signed by the CA, unless NAME.crt exists already.
issue() {
  local base=$1 cn=$2 eku=$3 san=${4:-}
  if [ -s "$base.crt" ] && [ -s "$base.key" ]; then
    return 0
  fi
  new_key "$base.key"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } >"$tmp/ext.cnf"
  openssl req -new -key "$base.key" -subj "/O=Ringcast/CN=$cn" -out "$tmp/leaf.csr"
  openssl x509 -req -in "$tmp/leaf.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -CAserial "$out/ca.srl" -sha256 -days "$cert_days" \
    -extfile "$tmp/ext.cnf" -out "$tmp/leaf.crt" 2>/dev/null
  chmod 644 "$tmp/leaf.crt"
  mv "$tmp/leaf.crt" "$base.crt"
  echo "make-certs: issued $base.crt (CN=$cn)"
}

san="DNS:localhost,IP:127.0.0.1,IP:::1"
if [ -n "${RINGCAST_BROKER_NAMES:-}" ]; then
  IFS=',' read -r -a extra <<<"$RINGCAST_BROKER_NAMES"
  for name in "${extra[@]}"; do
    name=${name// /}
    [ -n "$name" ] || continue
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
      san="$san,IP:$name"
    else
      san="$san,DNS:$name"
    fi
  done
fi

server_cn=${RINGCAST_BROKER_NAMES:-}
server_cn=${server_cn%%,*}
server_cn=${server_cn// /}
issue "$out/server" "${server_cn:-localhost}" serverAuth "$san"
issue "$out/controller" "$controller_cn" clientAuth
issue "$out/observer" "$observer_cn" clientAuth
for id in "$@"; do
  issue "$out/devices/$id" "$id" clientAuth
done
