# -*- coding: utf-8 -*-
"""A small HTTP client and a Docker registry API v2 client (stdlib only).

request() never raises on an HTTP status: it returns a Response and the
caller decides. Redirects are not followed. Bodies are bytes.

RegistryClient speaks the registry API with either no auth, Basic auth or
the Docker token protocol: on a 401 with a Bearer challenge it asks the
realm for a token (with Basic credentials if it has any), caches it per
scope, and retries once.
"""

from __future__ import print_function, absolute_import, division

import base64
import hashlib
import json
import re

from . import (SupportError, httplib, to_bytes, to_text, urlsplit,
               urlencode)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = \
    "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = \
    "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

ALL_MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST,
                      OCI_INDEX)


def sha256_digest(data):
    """Return "sha256:<hex>" of bytes data."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Response(object):
    """status, reason, headers (lower-case name -> value), body (bytes)."""

    def __init__(self, status, reason, headers, body, url):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.url = url

    def header(self, name, default=None):
        """Return the value of header name (case-insensitive)."""
        return self.headers.get(name.lower(), default)

    def json(self):
        """Return the body parsed as JSON."""
        return json.loads(to_text(self.body))

    def __repr__(self):
        return "<Response %s %s %r>" % (self.status, self.url,
                                        self.body[:200])


def basic_auth_header(username, password):
    """Return the value of an Authorization: Basic header."""
    raw = to_bytes("%s:%s" % (username, password))
    return "Basic " + to_text(base64.b64encode(raw))


def request(method, url, body=None, headers=None, timeout=60.0):
    """Send one HTTP request to an http:// URL and return a Response."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise SupportError("only http:// URLs are supported: %s" % url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = httplib.HTTPConnection(parts.hostname, parts.port or 80,
                                  timeout=timeout)
    try:
        conn.request(method, path, body, dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        hdrs = {}
        for name, value in resp.getheaders():
            name = name.lower()
            hdrs[name] = hdrs[name] + ", " + value if name in hdrs else value
        return Response(resp.status, resp.reason, hdrs, data, url)
    finally:
        conn.close()


def parse_challenge(value):
    """Split a WWW-Authenticate value into (scheme, {param: value})."""
    if not value:
        return None, {}
    scheme, _, rest = value.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryClient(object):
    """Registry API v2 client for tests and for pushing test images."""

    def __init__(self, url, username=None, password=None, timeout=60.0):
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self.timeout = timeout
        self.tokens = {}  # scope hint -> bearer token
        self.token_fetches = 0
        self._use_basic = False

    # -- transport -----------------------------------------------------

    def _credentials_header(self):
        if self.username is None:
            return {}
        return {"Authorization": basic_auth_header(self.username,
                                                   self.password)}

    def fetch_token(self, realm, service=None, scopes=()):
        """Ask realm for a token; return the parsed JSON reply."""
        query = []
        if service is not None:
            query.append(("service", service))
        for scope in scopes:
            query.append(("scope", scope))
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        resp = request("GET", url, headers=self._credentials_header(),
                       timeout=self.timeout)
        self.token_fetches += 1
        if resp.status != 200:
            raise SupportError("token request %s failed: %s %s"
                               % (url, resp.status, to_text(resp.body)))
        return resp.json()

    def request(self, method, path, body=None, headers=None, scope=None):
        """Send method path (or absolute URL), authenticating as needed.

        scope is the cache key for a bearer token (e.g. the repository
        name); the token itself is requested for the challenge's scope.
        """
        url = path if path.startswith("http") else self.url + path
        hdrs = dict(headers or {})
        if scope in self.tokens:
            hdrs["Authorization"] = "Bearer " + self.tokens[scope]
        elif self._use_basic:
            hdrs.update(self._credentials_header())
        resp = request(method, url, body, hdrs, self.timeout)
        if resp.status != 401:
            return resp
        scheme, params = parse_challenge(resp.header("www-authenticate"))
        if scheme == "basic" and self.username is not None:
            self._use_basic = True
            hdrs.update(self._credentials_header())
        elif scheme == "bearer" and "realm" in params:
            scopes = params["scope"].split(" ") if params.get("scope") else []
            reply = self.fetch_token(params["realm"], params.get("service"),
                                     scopes)
            token = reply.get("token") or reply.get("access_token")
            self.tokens[scope] = token
            hdrs["Authorization"] = "Bearer " + token
        else:
            return resp
        return request(method, url, body, hdrs, self.timeout)

    # -- registry API --------------------------------------------------

    def ping(self):
        """GET /v2/ and return the Response."""
        return self.request("GET", "/v2/")

    def get_manifest(self, repo, ref, accept=ALL_MANIFEST_TYPES,
                     method="GET"):
        """GET (or HEAD) /v2/repo/manifests/ref and return the Response."""
        return self.request(method, "/v2/%s/manifests/%s" % (repo, ref),
                            headers={"Accept": ", ".join(accept)},
                            scope=repo)

    def get_blob(self, repo, digest, headers=None, method="GET"):
        """GET (or HEAD) /v2/repo/blobs/digest and return the Response."""
        return self.request(method, "/v2/%s/blobs/%s" % (repo, digest),
                            headers=headers, scope=repo)

    def blob_exists(self, repo, digest):
        """Return True if the registry has the blob in repo."""
        return self.get_blob(repo, digest, method="HEAD").status == 200

    def upload_blob(self, repo, data, digest=None):
        """Upload bytes data to repo unless present; return its digest."""
        digest = digest or sha256_digest(data)
        if self.blob_exists(repo, digest):
            return digest
        resp = self.request("POST", "/v2/%s/blobs/uploads/" % repo,
                            headers={"Content-Length": "0"}, scope=repo)
        if resp.status != 202:
            raise SupportError("upload start %s: %s %s"
                               % (repo, resp.status, to_text(resp.body)))
        location = resp.header("location")
        location += ("&" if "?" in location else "?") + \
            urlencode([("digest", digest)])
        resp = self.request("PUT", location, data,
                            {"Content-Type": "application/octet-stream"},
                            scope=repo)
        if resp.status != 201:
            raise SupportError("upload %s %s: %s %s"
                               % (repo, digest, resp.status,
                                  to_text(resp.body)))
        return digest

    def put_manifest(self, repo, ref, data, media_type):
        """PUT a manifest; return the digest the registry reports."""
        resp = self.request("PUT", "/v2/%s/manifests/%s" % (repo, ref), data,
                            {"Content-Type": media_type}, scope=repo)
        if resp.status != 201:
            raise SupportError("manifest %s:%s: %s %s"
                               % (repo, ref, resp.status, to_text(resp.body)))
        return resp.header("docker-content-digest")

    def tags(self, repo):
        """Return the tag list of repo."""
        resp = self.request("GET", "/v2/%s/tags/list" % repo, scope=repo)
        if resp.status != 200:
            raise SupportError("tags %s: %s" % (repo, resp.status))
        return resp.json().get("tags") or []

    def delete_manifest(self, repo, digest):
        """DELETE a manifest by digest; return the Response."""
        return self.request("DELETE", "/v2/%s/manifests/%s" % (repo, digest),
                            scope=repo)
