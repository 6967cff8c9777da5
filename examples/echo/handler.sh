#!/bin/sh
# A fork-mode handler: the request body arrives on stdin, stdout is the
# response. Request headers are in Http_* variables, as with the OpenFaaS
# watchdog.
printf 'topic=%s call=%s\n' "${Http_X_Topic:-}" "${Http_X_Call_Id:-}"
cat
