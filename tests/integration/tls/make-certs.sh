#!/bin/sh
# Regenerates the test-only TLS material used by test_security.py (valid for 100 years):
# a CA, a server certificate for localhost/127.0.0.1 and a client certificate whose key is
# encrypted with the passphrase "client-key-pass". Never use these outside the tests.
set -eu
cd "$(dirname "$0")"
days=36500
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days $days -subj "/CN=streamvi test CA"
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"
printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days $days -extfile server.ext
openssl req -newkey rsa:2048 -passout pass:client-key-pass -keyout client.key -out client.csr -subj "/CN=streamvi-client"
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days $days
rm -f server.csr client.csr server.ext ca.srl ca.key
