#!/bin/sh
# Follow migrations live with nc; Ctrl-C to stop.
#   follow-migrations.sh [HOST [PORT]]
host=${1:-127.0.0.1} port=${2:-4271}
{ printf 'watch\r\n'; while sleep 3600; do :; done; } | nc "$host" "$port" |
    grep --line-buffered -E '^210-[0-9:]+ (migrating|migrated|migration-failed) '
