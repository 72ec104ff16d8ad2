# meshless/meshlessd: meshlessd and meshless-cni, static (CGO_ENABLED=0), in /usr/local/bin.
#
#   docker build -t meshless/meshlessd:dev .                  # default: Debian slim + iptables
#   docker build --target static -t meshless/meshlessd:dev .  # FROM scratch, no iptables
#
# `make image` builds the equivalent of the default target without Docker: the static binaries
# plus the build machine's iptables (its links, shared libraries and extensions), in
# bin/meshless-image.tar.
#
# Why iptables is in the default image: the CNI plugin applies the pods' capture rules on the host
# (the runtime execs meshless-cni from the host's CNI bin dir, so it uses the host's iptables), but
# meshlessd itself runs iptables in its container: at start it detects the node's iptables backend
# (iptables-legacy-save / iptables-nft-save, recorded in --state-dir), it adopts pods that run
# without the chain by running the chained plugin (iptables-*-save and -restore in their netns),
# and on `kubectl delete -k` it removes the pods' rules. The `static` image has none of that: use
# it only with a backend record already on the node (`legacy` or `nft` in
# /var/lib/meshless/iptables-backend) and with adoption off (--adopt-interval=0).

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /out/meshlessd ./daemon && \
    CGO_ENABLED=0 go build -trimpath -o /out/meshless-cni ./plugin

# The static binaries alone (what `make image` writes when the machine has no iptables).
FROM scratch AS static
COPY --from=build /out/meshlessd /out/meshless-cni /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/meshlessd"]

FROM debian:bookworm-slim
RUN apt-get update && \
    apt-get install -y --no-install-recommends iptables && \
    rm -rf /var/lib/apt/lists/*
COPY --from=build /out/meshlessd /out/meshless-cni /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/meshlessd"]
