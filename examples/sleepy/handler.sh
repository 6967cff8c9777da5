#!/bin/sh
# Runs only while there is work: ebb dev stops its replica after 5 s idle
# and starts one again when an event arrives.
body=$(cat)
echo "sleepy: woke up for \"$body\" (pid $$)" >&2
echo "done"
