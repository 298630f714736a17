# syntax=docker/dockerfile:1
# Production image: a static-ish release binary on distroless, running as a non-root user.
# Point it at PostgreSQL, tell it the public https address Stripe delivers webhooks to, and
# give it its secrets through the environment (it refuses to start without any of them):
#   docker run -e ATLAS_STRIPE__DATABASE__URL=postgres://… \
#              -e ATLAS_STRIPE__WEBHOOKS__PUBLIC_BASE_URL=https://stripe.atlas.example \
#              -e ATLAS_STRIPE__CRYPTO__MASTER_KEYS=k1:… -e ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID=k1 \
#              -e ATLAS_STRIPE__CRYPTO__FINGERPRINT_KEY=… -e ATLAS_STRIPE__AUTH__TENANT_TOKEN_SECRET=… \
#              -p 8080:8080 -p 9090:9090 atlas-stripe
# Port 9090 (server.ops_bind) serves /healthz, /readyz and /metrics: point the probes
# and the scraper there, and keep it off the public network.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# mimalloc's compiled-in defaults (idle memory): see .cargo/config.toml.
COPY .cargo .cargo
COPY src src
COPY migrations migrations
COPY config config
COPY static static
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin atlas-stripe \
    && cp target/release/atlas-stripe /atlas-stripe

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=build /atlas-stripe /usr/local/bin/atlas-stripe
COPY config /app/config
# config/production.toml: binds 0.0.0.0, JSON logs, no generated development secrets (not
# even if a layer asks), and webhooks.public_base_url left empty: without its secrets or a
# public https webhook URL the service refuses to start, naming the setting.
# `docker run … keys generate --id k1` needs no configuration.
ENV ATLAS_STRIPE_ENVIRONMENT=production
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/atlas-stripe"]
CMD ["serve"]
