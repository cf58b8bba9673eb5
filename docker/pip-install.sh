#!/bin/sh
# `pip install "$@"` inside the image build, with the build's optional secrets. The Dockerfile
# mounts this file (never copied into the image) together with the secrets and a tmpfs on /tmp,
# so nothing below ends up in a layer:
#   ca_certs  extra CA certificates (PEM), e.g. a TLS-intercepting company proxy's root;
#             added to the system bundle for this one pip run
#   pip_conf  a pip.conf: index-url with credentials, proxy, trusted-host, timeouts ...
set -eu
if [ -s /run/secrets/ca_certs ]; then
  cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca_certs > /tmp/ca-bundle.pem
  export PIP_CERT=/tmp/ca-bundle.pem
fi
if [ -s /run/secrets/pip_conf ]; then
  export PIP_CONFIG_FILE=/run/secrets/pip_conf
fi
exec pip install "$@"
