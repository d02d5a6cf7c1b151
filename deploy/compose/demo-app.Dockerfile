# The demo apps of docker-compose.yml: an HTTP server (busybox httpd) with a known page, and a
# client (curl). Nothing in them knows about Latch. Build context: any folder (nothing is
# copied in); `cargo xtask compose build` builds it as latch-demo-app:local. Like the Latch
# image, it installs with apt only what the base image lacks (BASE: see Dockerfile).
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN set -eu; \
    missing=""; \
    for need in busybox:busybox curl:curl; do \
      command -v "${need%%:*}" >/dev/null 2>&1 || missing="$missing ${need#*:}"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends $missing; \
      rm -rf /var/lib/apt/lists/*; \
    fi \
 && mkdir -p /srv/www \
 && echo "hello from the demo server, through the Latch mesh" > /srv/www/index.html

CMD ["busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/srv/www"]
