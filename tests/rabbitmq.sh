# RabbitMQ for the migration tests (`aiida-zmq migrate --to/--from rabbitmq`), sourced by tests/run.sh.
#
# rabbitmq_start starts a RabbitMQ on 127.0.0.1 only when nothing listens on its port yet, installing it first where
# this machine can (Debian/Ubuntu as root); rabbitmq_stop stops it again, and only if rabbitmq_start started it: a
# RabbitMQ that was running before (a developer's, a CI service, one shared by several jobs) is never touched.
# run.sh calls rabbitmq_stop from an EXIT trap, so it runs on success, on failure and on Ctrl-C alike.
#
# The standard RabbitMQ variables apply: RABBITMQ_NODE_PORT (default 5672) and RABBITMQ_NODENAME (a second node next
# to a running one: tests/test_run_sh.py does that). AIIDA_ZMQ_NO_RABBITMQ=1 opts out (the migration tests skip).

RABBITMQ_NODE_PORT=${RABBITMQ_NODE_PORT:-5672}
RABBITMQ_STARTED=
RABBITMQ_STARTED_EPMD=

rabbitmq_listening() { (exec 3<>"/dev/tcp/127.0.0.1/$RABBITMQ_NODE_PORT") 2>/dev/null; }

rabbitmq_start() {
    if [ -n "${AIIDA_ZMQ_NO_RABBITMQ:-}" ] || rabbitmq_listening; then
        return 0
    fi
    if ! command -v rabbitmq-server >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo '== installing rabbitmq-server (for the migration tests)'
        timeout 600 apt-get install -y -qq rabbitmq-server >/dev/null 2>&1 \
            || (timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 600 apt-get install -y -qq rabbitmq-server >/dev/null 2>&1) \
            || echo 'could not install rabbitmq-server: the migration tests will skip'
        # Debian starts the service it installs: that one is ours to stop too.
        rabbitmq_listening && RABBITMQ_STARTED=1
    fi
    if ! command -v rabbitmq-server >/dev/null; then
        return 0
    fi
    # epmd (Erlang's port mapper) comes up with the first Erlang node: stop it too if it was not running before.
    if ! (exec 3<>/dev/tcp/127.0.0.1/4369) 2>/dev/null; then
        RABBITMQ_STARTED_EPMD=1
    fi
    if [ -z "$RABBITMQ_STARTED" ]; then
        echo "== starting RabbitMQ on 127.0.0.1:$RABBITMQ_NODE_PORT (stopped again when the tests end)"
        RABBITMQ_STARTED=1
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
            rabbitmq-server -detached >/dev/null 2>&1 || true
    fi
    for _ in $(seq 1 240); do rabbitmq_listening && break; sleep 0.5; done
    rabbitmq_listening || echo 'RabbitMQ did not come up within 120 s: the migration tests will skip'
}

rabbitmq_stop() {
    if [ -z "$RABBITMQ_STARTED" ]; then
        return 0
    fi
    RABBITMQ_STARTED=
    echo '== stopping the RabbitMQ these tests started'
    local node=()
    if [ -n "${RABBITMQ_NODENAME:-}" ]; then
        node=(-n "$RABBITMQ_NODENAME")
    fi
    timeout 120 rabbitmqctl ${node[@]+"${node[@]}"} stop >/dev/null 2>&1 \
        || echo 'rabbitmqctl stop failed: RabbitMQ may still run'
    for _ in $(seq 1 60); do rabbitmq_listening || break; sleep 1; done
    if [ -n "$RABBITMQ_STARTED_EPMD" ] && command -v epmd >/dev/null; then
        # Refused while another Erlang node is registered: then it is not only ours.
        epmd -kill >/dev/null 2>&1 || true
    fi
}
