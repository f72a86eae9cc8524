# wbcache's edge: Varnish 7 with the xkey vmod (Debian: varnish, varnish-modules).
#
# Caches only what the API marks shareable (Cache-Control "public" or "s-maxage": the
# collections COLLECTION_CACHE makes public), serves stale copies within the API's
# stale-while-revalidate / stale-if-error windows, revalidates expired copies with
# If-None-Match (the API answers 304), and drops a record's or a collection's copies when
# wbcache purges them by surrogate key (EDGE_PURGE_URLS=http://<this edge>). Everything
# under /v1/ that is not a record read (writes, batch, stats, dead letters, listing,
# invalidate) and every other path (/metrics, /dashboard, /readyz) goes straight through.
# docs/edge.md explains each choice; tests/integration/test_edge.py runs this file.
vcl 4.1;

import std;
import xkey;

# The API. A deployment edits .host and .port (docker-compose.yml: the api service).
backend default {
    .host = "127.0.0.1";
    .port = "8000";
    # stale-if-error needs to know the API is down before asking it.
    .probe = {
        .url = "/healthz";
        .interval = 1s;
        .timeout = 1s;
        .window = 3;
        .threshold = 2;
        .initial = 2;
    }
}

# Who may purge: wbcache's workers. Loopback, and the private networks a container
# platform gives them; narrow it to your workers' addresses.
acl purgers {
    "127.0.0.1";
    "::1";
    "10.0.0.0"/8;
    "172.16.0.0"/12;
    "192.168.0.0"/16;
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(403, "Forbidden: purges are accepted from the purgers ACL only"));
        }
        if (!req.http.xkey-purge) {
            return (synth(400, "Name the surrogate keys to purge in xkey-purge"));
        }
        # A hard purge: a soft one would let stale-while-revalidate serve the old version.
        set req.http.n-gone = xkey.purge(req.http.xkey-purge);
        return (synth(200, "Purged " + req.http.n-gone + " objects"));
    }
    unset req.http.X-Wb-Fwd;
    if (req.restarts == 0) {
        unset req.http.X-Wb-Stale-Refused;
        unset req.http.X-Wb-Stale-Ok;
    } elsif (req.http.X-Wb-Stale-Ok) {
        # The fresh fetch failed: any stale copy within its grace (stale-if-error) will do.
        set req.grace = 100d;
    } elsif (req.http.X-Wb-Stale-Refused) {
        # vcl_hit refused a stale copy: look up again, and fetch if only stale ones exist.
        set req.grace = 0s;
    }
    # Only record reads are looked up: /v1/<collection>/<key>, GET or HEAD.
    if ((req.method == "GET" || req.method == "HEAD") && req.url ~ "^/v1/[^/?]+/[^/?]+(\?.*)?$") {
        # The API decides what is shareable; cookies and credentials do not change a
        # public record (a collection marked public is served to anyone reaching the edge).
        return (hash);
    }
    return (pass);
}

sub vcl_hit {
    # Within its TTL: fresh. Past it, a stale copy is served (and refreshed in the
    # background) only within stale-while-revalidate, or within stale-if-error while the
    # API is down (its probe fails, or the fresh fetch failed: vcl_deliver); otherwise the
    # request waits for a fresh copy.
    if (obj.ttl < 0s
        && obj.ttl + std.duration(obj.http.X-Wb-Swr + "s", 0s) < 0s
        && !req.http.X-Wb-Stale-Ok
        && std.healthy(req.backend_hint)) {
        set req.http.X-Wb-Stale-Refused = "1";
        return (restart);
    }
    return (deliver);
}

sub vcl_pass {
    set req.http.X-Wb-Fwd = "bypass";
}

sub vcl_backend_response {
    if (beresp.status >= 500) {
        # Never stored, and never in place of a stale copy: a failed refresh keeps the
        # old one, and a failed fetch falls back to it (vcl_deliver).
        if (bereq.is_bgfetch) {
            return (abandon);
        }
        set beresp.uncacheable = true;
        set beresp.ttl = 0s;
        return (deliver);
    }
    if (bereq.uncacheable) {
        return (deliver);
    }
    # Stored only when the API says a shared cache may store it: never by heuristics (a
    # 404 without Cache-Control used to be kept for Varnish's default 120 s).
    if (!beresp.http.Cache-Control
        || beresp.http.Cache-Control ~ "(?i)(private|no-store|no-cache)"
        || beresp.http.Cache-Control !~ "(?i)(public|s-maxage)"
        || beresp.http.Set-Cookie) {
        set beresp.ttl = 5s;
        set beresp.uncacheable = true;
        return (deliver);
    }
    # Purge handles: the API names the collection and the record in Surrogate-Key.
    if (beresp.http.Surrogate-Key) {
        set beresp.http.xkey = beresp.http.Surrogate-Key;
    }
    # beresp.ttl is already s-maxage (else max-age). stale-while-revalidate is vcl_hit's
    # window; grace keeps the copy for the longer of it and stale-if-error.
    set beresp.http.X-Wb-Swr = "0";
    if (beresp.http.Cache-Control ~ "stale-while-revalidate=[0-9]+") {
        set beresp.http.X-Wb-Swr = regsub(beresp.http.Cache-Control,
            "^.*stale-while-revalidate=([0-9]+).*$", "\1");
    }
    set beresp.grace = std.duration(beresp.http.X-Wb-Swr + "s", 0s);
    if (beresp.http.Cache-Control ~ "stale-if-error=[0-9]+") {
        set beresp.grace = std.duration(regsub(beresp.http.Cache-Control,
            "^.*stale-if-error=([0-9]+).*$", "\1s"), 0s);
        if (beresp.grace < std.duration(beresp.http.X-Wb-Swr + "s", 0s)) {
            set beresp.grace = std.duration(beresp.http.X-Wb-Swr + "s", 0s);
        }
    }
    # Kept past grace only to revalidate: the next fetch sends If-None-Match with its
    # ETag, and a 304 refreshes it without the body.
    set beresp.keep = 1h;
    return (deliver);
}

sub vcl_backend_error {
    # The API is unreachable during a background refresh: keep serving the stale copy.
    if (bereq.is_bgfetch) {
        return (abandon);
    }
}

sub vcl_deliver {
    if (resp.status >= 500 && req.http.X-Wb-Stale-Refused && !req.http.X-Wb-Stale-Ok) {
        # stale-if-error: the fetch that replaced a stale copy failed; serve that copy.
        set req.http.X-Wb-Stale-Ok = "1";
        return (restart);
    }
    # RFC 9211: the API's entry first (wbcache; hit|fwd=miss), then this cache's.
    if (req.http.X-Wb-Fwd == "bypass") {
        set resp.http.Cache-Status = resp.http.Cache-Status + ", varnish; fwd=bypass";
    } elsif (obj.uncacheable) {
        set resp.http.Cache-Status = resp.http.Cache-Status + ", varnish; fwd=uri-miss";
    } elsif (obj.hits > 0) {
        set resp.http.Cache-Status = resp.http.Cache-Status + ", varnish; hit; ttl=" + obj.ttl;
    } else {
        set resp.http.Cache-Status = resp.http.Cache-Status + ", varnish; fwd=miss; stored";
    }
    set resp.http.Cache-Status = regsub(resp.http.Cache-Status, "^, ", "");
    unset resp.http.xkey;
    unset resp.http.X-Wb-Swr;
}
