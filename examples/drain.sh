#!/bin/sh
# Drain a node with nc: block it, send its guests away, show what is left.
#   drain.sh [HOST [PORT]]
host=${1:-127.0.0.1} port=${2:-4271}
printf 'block\r\nexpel\r\nquit\r\n' | nc -N "$host" "$port" | sed -n 's/^2[0-9][0-9][- ]//p'
