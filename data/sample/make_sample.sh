#!/bin/sh
# Rebuild train.txt and heldout.txt from WikiText-2 (see ATTRIBUTION.md).
# Usage: sh data/sample/make_sample.sh [DIR with valid.txt and test.txt]
# Lines are copied byte for byte; only empty lines and " = Heading = " lines are dropped.
set -eu
SRC=${1:-../shared/corpora/wikitext-2}
HERE=$(dirname "$0")
KEEP='!/^ *$/ && !/^ =.* = $/'
# train: the whole validation split.
awk "$KEEP" "$SRC/valid.txt" > "$HERE/train.txt"
# heldout: the first 12 articles of the test split (an article starts at a " = Title = " line).
awk "/^ = [^=].* = \$/ { article++ } article <= 12 && $KEEP" "$SRC/test.txt" > "$HERE/heldout.txt"
