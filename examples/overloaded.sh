#!/bin/sh
# List overloaded nodes with nothing but nc: the control protocol is plain text.
#   overloaded.sh [HOST [PORT [THRESHOLD]]]
host=${1:-127.0.0.1} port=${2:-4271} threshold=${3:-1.0}
printf 'nodes\r\nquit\r\n' | nc -N "$host" "$port" |
    awk -v t="$threshold" '
        /^200-ID / { next }                       # the header line
        /^200-/ && $6 + 0 > t { sub(/^200-\*?/, ""); print $2, $3, "load", $6; n++ }
        END { exit n ? 0 : 1 }'
