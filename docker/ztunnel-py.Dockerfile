# ztunnel-py: the ambient node proxy, with its C byte path (dataplane/_c) compiled into the wheel.
#   docker build -f docker/ztunnel-py.Dockerfile -t docker.io/istiopy/ztunnel-py:0.1.0 .
FROM python:3.12-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* libssl-dev=3.0.* libnghttp2-dev=1.52.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; w = glob.glob('/wheels/istiopy-*.whl')[0]; sys.exit(0 if any('_fastpath' in n for n in zipfile.ZipFile(w).namelist()) else 'C extension missing from ' + w)"

FROM python:3.12-slim-bookworm
# iptables/iproute2: in-pod redirection rules; libssl3 and libnghttp2 for the C byte path (TLS, HTTP/2).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables=1.8.* iproute2=6.1.* libssl3=3.0.* libnghttp2-14=1.52.* \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Runs as root with NET_ADMIN, SYS_ADMIN and NET_RAW only (see the ztunnel chart's securityContext).
EXPOSE 15020 15021
ENTRYPOINT ["ztunnel-py"]
