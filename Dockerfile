# Portcullis: multi-stage build; the final image holds only the binary and a default config,
# runs as a non-root UID and needs no writable root filesystem.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin portcullis && strip target/release/portcullis

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
COPY config/container.toml /etc/portcullis/portcullis.toml
USER 65532:65532
EXPOSE 6432 6380 9898
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/portcullis", "health", "--config", "/etc/portcullis/portcullis.toml"]
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]
