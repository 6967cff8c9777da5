#!/bin/sh
# Fails sometimes. "flaky" in the body: the first attempt fails, the retry
# succeeds. "poison": every attempt fails, so after max-attempts the event
# goes to the dead-letter topic. Anything else succeeds.
body=$(cat)
attempt=${Http_Ebb_Attempt:-1}
case "$body" in
*poison*)
    echo "orders: cannot process \"$body\" (attempt $attempt)" >&2
    exit 1
    ;;
*flaky*)
    if [ "$attempt" = 1 ]; then
        echo "orders: failing the first attempt of \"$body\"" >&2
        exit 1
    fi
    ;;
esac
echo "orders: processed \"$body\" (attempt $attempt)" >&2
echo "ok"
