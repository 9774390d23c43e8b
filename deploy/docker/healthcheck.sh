#!/bin/bash
# Container health check: exits 0 when http://127.0.0.1:PORT/PATH answers 200.
# Usage: roomcast-healthcheck [PORT] [PATH]   (defaults: 8080 /readyz)
# Uses bash's /dev/tcp, so the runtime image needs neither curl nor wget.
port=${1:-8080}
path=${2:-/readyz}
{ exec 3<>"/dev/tcp/127.0.0.1/${port}"; } 2>/dev/null || exit 1
printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
IFS=' ' read -r -t 3 _version status _ <&3 || exit 1
[ "$status" = "200" ]
