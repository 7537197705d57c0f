#!/usr/bin/env bash
# Start MariaDB, Redis, PostgreSQL and RabbitMQ on 127.0.0.1 when they are installed but down
# (CI and fresh sessions).
set -euo pipefail

if command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ]; then
    if ! mysqladmin -uroot -h127.0.0.1 --connect-timeout=2 ping >/dev/null 2>&1; then
        echo "services: starting MariaDB" >&2
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
        for _ in $(seq 60); do
            mysqladmin -uroot -h127.0.0.1 --connect-timeout=2 ping >/dev/null 2>&1 && break
            sleep 1
        done
    fi
fi
if command -v redis-server >/dev/null; then
    if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
        echo "services: starting Redis" >&2
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
        for _ in $(seq 30); do
            redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
            sleep 1
        done
    fi
fi
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
        echo "services: starting PostgreSQL" >&2
        for version in /etc/postgresql/*; do
            pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
        done
        for _ in $(seq 60); do
            pg_isready -h 127.0.0.1 -p 5432 -q && break
            sleep 1
        done
    fi
fi
if command -v rabbitmq-server >/dev/null; then
    if ! rabbitmqctl -q status >/dev/null 2>&1; then
        echo "services: starting RabbitMQ" >&2
        rabbitmq-server -detached || true
        for _ in $(seq 120); do
            rabbitmqctl -q status >/dev/null 2>&1 && break
            sleep 1
        done
    fi
fi
