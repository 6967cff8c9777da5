#!/bin/sh
# Receives what `orders` gave up on, with the reason in the dead-letter headers.
body=$(cat)
echo "dead-letters: \"$body\" from ${Http_Ebb_Original_Topic:-?} after ${Http_Ebb_Attempts:-?} attempts (${Http_Ebb_Dead_Letter_Reason:-?})" >&2
