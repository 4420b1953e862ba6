#!/usr/bin/env bash
# One-shot `es-certs` service: the TLS material of the Elasticsearch node, made with
# elasticsearch-certutil as in Elastic's Docker Compose docs. Idempotent: existing files are kept, so a
# restart never changes the certificates that clients already trust.
#
# Three places, so that each container sees only what it needs:
#   $CA_DIR      ca.crt + ca.key   -- this service only (signs future node certificates)
#   $NODE_DIR    <node>.crt/.key + ca.crt -- the elasticsearch container(s) only
#   $PUBLIC_DIR  ca.crt            -- every client (es-setup, Airflow, storefront), read-only
#
# Environment (defaults are the compose paths): ES_HOME, CA_DIR, NODE_DIR, PUBLIC_DIR, ES_NODE_NAME,
# ES_NODE_NAMES (comma-separated: one certificate per node, for a cluster; default: ES_NODE_NAME),
# ES_CERT_DNS (comma-separated names in every node's certificate, besides the node's own name), ES_CERT_IP,
# ES_CERT_DAYS, CERT_OWNER (uid:gid that must be able to read the node keys; default 0:0 with group-read,
# which the elasticsearch user has). A node added later gets its certificate at the next run; the
# existing ones (and the CA) are kept.
set -euo pipefail

ES_HOME="${ES_HOME:-/usr/share/elasticsearch}"
CA_DIR="${CA_DIR:-/certs/ca}"
NODE_DIR="${NODE_DIR:-/certs/node}"
PUBLIC_DIR="${PUBLIC_DIR:-/certs/public}"
NODES="${ES_NODE_NAMES:-${ES_NODE_NAME:-elasticsearch}}"
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

# the DNS names of one node's certificate: its own name first, then ES_CERT_DNS (without repeats)
node_dns() {
  local node="$1" name
  echo "$node"
  IFS=',' read -ra names <<< "$DNS"
  for name in "${names[@]}"; do [[ -n "$name" && "$name" != "$node" ]] && echo "$name"; done
  return 0
}

IFS=',' read -ra all_nodes <<< "$NODES"
missing=()
for node in "${all_nodes[@]}"; do
  [[ -z "$node" ]] && continue
  [[ -f "$NODE_DIR/$node.crt" && -f "$NODE_DIR/$node.key" ]] || missing+=("$node")
done

if (( ${#missing[@]} )); then
  for node in "${missing[@]}"; do
    echo "es-certs: creating the certificate of $node (dns: $(node_dns "$node" | tr '\n' ' '); ip: $IP)"
  done
  {
    echo "instances:"
    for node in "${missing[@]}"; do
      echo "  - name: $node"
      echo "    dns:"
      node_dns "$node" | while read -r name; do echo "      - $name"; done
      echo "    ip:"
      IFS=',' read -ra ips <<< "$IP"
      for ip in "${ips[@]}"; do echo "      - $ip"; done
    done
  } > "$work/instances.yml"
  "$certutil" cert --silent --pem --days "$DAYS" --in "$work/instances.yml" --out "$work/certs.zip" \
    --ca-cert "$CA_DIR/ca.crt" --ca-key "$CA_DIR/ca.key"
  unzip -q -o "$work/certs.zip" -d "$work"
  for node in "${missing[@]}"; do
    install -m 0640 "$work/$node/$node.key" "$NODE_DIR/$node.key"
    install -m 0644 "$work/$node/$node.crt" "$NODE_DIR/$node.crt"
  done
fi

# the CA certificate (public) goes wherever a peer must verify the node
install -m 0644 "$CA_DIR/ca.crt" "$NODE_DIR/ca.crt"
install -m 0644 "$CA_DIR/ca.crt" "$PUBLIC_DIR/ca.crt"
chown -R "$OWNER" "$NODE_DIR" "$PUBLIC_DIR"
chmod 0750 "$NODE_DIR"
chmod 0755 "$PUBLIC_DIR"
echo "es-certs: ready (nodes $NODES: $NODE_DIR, CA certificate for clients: $PUBLIC_DIR/ca.crt)"
