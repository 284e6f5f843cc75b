-- wrk script for bench/push.sh: every request is a Channel Protocol v1 ping.
-- The project token comes from the environment (AION_TOKEN), so no secret is
-- written into this file. Keep-alive is wrk's default (HTTP/1.1).
local token = os.getenv("AION_TOKEN") or ""
wrk.method = "POST"
wrk.path = "/"
wrk.body = '{"v":1,"action":"ping","token":"' .. token .. '"}'
wrk.headers["Content-Type"] = "application/json"
