#!/usr/bin/env bash
# One-shot `es-certs` service: the TLS material of the Elasticsearch node, made with
# elasticsearch-certutil as in Elastic's Docker Compose docs. Idempotent: existing files are kept, so a
# restart never changes the certificates that clients already trust.
#
# Three places, so that each container sees only what it needs:
#   $CA_DIR      ca.crt + ca.key   -- this service only (signs future node certificates)
#   $NODE_DIR    <node>.crt/.key + ca.crt -- the elasticsearch container only
#   $PUBLIC_DIR  ca.crt            -- every client (es-setup, Airflow, storefront), read-only
#
# Environment (defaults are the compose paths): ES_HOME, CA_DIR, NODE_DIR, PUBLIC_DIR, ES_NODE_NAME,
# ES_CERT_DNS (comma-separated names in the certificate), ES_CERT_IP, ES_CERT_DAYS, CERT_OWNER (uid:gid
# that must be able to read the node key; default 0:0 with group-read, which the elasticsearch user has).
set -euo pipefail

ES_HOME="${ES_HOME:-/usr/share/elasticsearch}"
CA_DIR="${CA_DIR:-/certs/ca}"
NODE_DIR="${NODE_DIR:-/certs/node}"
PUBLIC_DIR="${PUBLIC_DIR:-/certs/public}"
NODE="${ES_NODE_NAME:-elasticsearch}"
DNS="${ES_CERT_DNS:-elasticsearch,localhost}"
IP="${ES_CERT_IP:-127.0.0.1}"
DAYS="${ES_CERT_DAYS:-1095}"
OWNER="${CERT_OWNER:-0:0}"
certutil="$ES_HOME/bin/elasticsearch-certutil"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 027

mkdir -p "$CA_DIR" "$NODE_DIR" "$PUBLIC_DIR"

if [[ ! -f "$CA_DIR/ca.crt" || ! -f "$CA_DIR/ca.key" ]]; then
  echo "es-certs: creating the certificate authority"
  "$certutil" ca --silent --pem --days "$DAYS" --out "$work/ca.zip"
  unzip -q -o "$work/ca.zip" -d "$work"
  install -m 0600 "$work/ca/ca.key" "$CA_DIR/ca.key"
  install -m 0644 "$work/ca/ca.crt" "$CA_DIR/ca.crt"
fi

if [[ ! -f "$NODE_DIR/$NODE.crt" || ! -f "$NODE_DIR/$NODE.key" ]]; then
  echo "es-certs: creating the certificate of $NODE (dns: $DNS; ip: $IP)"
  {
    echo "instances:"
    echo "  - name: $NODE"
    echo "    dns:"
    IFS=',' read -ra names <<< "$DNS"
    for name in "${names[@]}"; do echo "      - $name"; done
    echo "    ip:"
    IFS=',' read -ra ips <<< "$IP"
    for ip in "${ips[@]}"; do echo "      - $ip"; done
  } > "$work/instances.yml"
  "$certutil" cert --silent --pem --days "$DAYS" --in "$work/instances.yml" --out "$work/certs.zip" \
    --ca-cert "$CA_DIR/ca.crt" --ca-key "$CA_DIR/ca.key"
  unzip -q -o "$work/certs.zip" -d "$work"
  install -m 0640 "$work/$NODE/$NODE.key" "$NODE_DIR/$NODE.key"
  install -m 0644 "$work/$NODE/$NODE.crt" "$NODE_DIR/$NODE.crt"
fi

# the CA certificate (public) goes wherever a peer must verify the node
install -m 0644 "$CA_DIR/ca.crt" "$NODE_DIR/ca.crt"
install -m 0644 "$CA_DIR/ca.crt" "$PUBLIC_DIR/ca.crt"
chown -R "$OWNER" "$NODE_DIR" "$PUBLIC_DIR"
chmod 0750 "$NODE_DIR"
chmod 0755 "$PUBLIC_DIR"
echo "es-certs: ready (node: $NODE_DIR, CA certificate for clients: $PUBLIC_DIR/ca.crt)"
