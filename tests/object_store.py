"""Real object-storage HTTP servers on 127.0.0.1 for tests; no internet needed.

``s3_server()`` runs moto's S3 server in a thread. ``oss_server()`` puts a
small Aliyun-OSS protocol adapter in front of one, so that the real clients
(s3fs, ossfs/oss2) speak real HTTP, as they would to the cloud::

    with oss_server() as store:                # or s3_server()
        store.create_bucket("bkt")
        fs = store.filesystem()                # fsspec.filesystem(store.protocol, **store.storage_options)
        fs.pipe("bkt/data/a.jsonl", b"{}\\n")

All servers in one process share moto's in-memory backend (moto keeps its
state in module globals); it is wiped when the last running server stops.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Iterator
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import fsspec
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server
from werkzeug.wsgi import get_input_stream

HOST = "127.0.0.1"
KEY = "testing"
SECRET = "testing"
REGION = "us-east-1"

# werkzeug logs every request at INFO on stderr; keep test output readable.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


@dataclass
class ObjectStore:
    """A running server: where it is and how to point s3fs / ossfs at it."""

    protocol: str  # "s3" or "oss"
    endpoint: str  # http://127.0.0.1:PORT
    storage_options: dict  # for fsspec.filesystem(protocol, **storage_options)
    env: dict  # environment variables naming the same server and credentials
    request_log: list = field(default_factory=list)  # OSS only: (method, "/path?query") received

    def filesystem(self, **kwargs) -> fsspec.AbstractFileSystem:
        """A fresh fsspec filesystem; uncached, so no listing cache leaks between tests."""
        options = {**self.storage_options, **kwargs}
        return fsspec.filesystem(self.protocol, skip_instance_cache=True, **options)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (ossfs cannot: its mkdir is a no-op)."""
        scheme = "OSS" if self.protocol == "oss" else "AWS"
        auth = {"Authorization": f"{scheme} {KEY}:unsigned"}  # moto checks no signatures
        status, _, body = _http(self.endpoint, "PUT", f"/{name}", auth)
        if status != 200:
            raise RuntimeError(f"create bucket {name!r}: HTTP {status} {body[:300]!r}")


def _http(base: str, method: str, path: str, headers=None, body: bytes = b""):
    """One request on its own connection (werkzeug closes each one anyway)."""
    conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


# ----------------------------------------------------------------- S3 (moto)

_running = 0  # moto servers up in this process
_running_lock = threading.Lock()


@contextlib.contextmanager
def _moto() -> Iterator[str]:
    """moto's S3 server on a free loopback port; port released on exit."""
    global _running
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    with _running_lock:
        _running += 1
    try:
        yield endpoint
    finally:
        with _running_lock, contextlib.suppress(OSError):
            _running -= 1
            if _running == 0:  # nobody else uses the shared state: start clean next time
                _http(endpoint, "POST", "/moto-api/reset")
        server.stop()
        server._server.server_close()  # stop() leaves the listening socket open


@contextlib.contextmanager
def s3_server() -> Iterator[ObjectStore]:
    """S3 on loopback (moto's own HTTP server), for s3fs / boto3."""
    with _moto() as endpoint:
        yield ObjectStore(
            protocol="s3",
            endpoint=endpoint,
            storage_options={
                "key": KEY,
                "secret": SECRET,
                # no region_name here: s3fs.mkdir would send it as LocationConstraint,
                # which S3 (and moto) refuse for us-east-1
                "client_kwargs": {"endpoint_url": endpoint},
            },
            env={
                "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_ENDPOINT_URL": endpoint,  # read by botocore >= 1.31, hence by s3fs
                "AWS_DEFAULT_REGION": REGION,
            },
        )


# ---------------------------------------------------------- OSS (adapter)

_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_LIST_PARAMS = {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}


def _oss_error(status: int, code: str, message: str, headers=()) -> tuple:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>{uuid.uuid4().hex}</RequestId></Error>"
    )
    return status, [("Content-Type", "application/xml"), *headers], body.encode()


def _to_oss_xml(body: bytes, host: str) -> ET.Element:
    """S3 XML -> OSS XML: oss2 looks tags up without the S3 namespace, and
    requires fields that S3 never sends (object Type, bucket endpoints)."""
    root = ET.fromstring(body)
    for el in root.iter():
        el.tag = el.tag.removeprefix(_S3_NS)
    required = [
        ("Contents", {"Type": "Normal"}),  # object listings
        ("Buckets/Bucket", {  # bucket listing
            "Location": "oss-" + REGION,
            "ExtranetEndpoint": host,
            "IntranetEndpoint": host,
            "StorageClass": "Standard",
        }),
    ]
    if root.tag == "ListMultipartUploadsResult":  # markers oss2 needs even when empty
        required.append((".", {"NextKeyMarker": "", "NextUploadIdMarker": ""}))
    for path, fields in required:
        for el in root.iterfind(path):
            for tag, text in fields.items():
                if el.find(tag) is None:
                    ET.SubElement(el, tag).text = text
    return root


class _OssAdapter:
    """WSGI app turning Aliyun OSS requests into S3 requests to moto.

    The differences oss2/ossfs run into, and what is done about each:
    - auth ``OSS key:sig`` becomes ``AWS key:signature`` (moto checks no signature);
      a request with no auth at all is refused, as by a private OSS bucket;
    - ``x-oss-*`` headers become ``x-amz-*``, and back in responses;
    - XML responses lose the S3 namespace and gain OSS-only fields;
    - ``GET /bkt/?bucketInfo`` (ossfs's bucket-exists check) is answered here;
    - ``POST /bkt/key?append&position=N`` is done as GET + PUT under a lock;
    - ``?objectMeta`` (oss2's HEAD for object_exists) becomes a plain HEAD;
    - V1 listings are served from moto's V2 listing, because moto's V1 repeats
      every common prefix on every page (ossfs lists 100 entries per page);
    - virtual-host requests (``bkt.host``) become path-style; oss2 itself
      uses path-style for an IP or localhost endpoint.
    """

    def __init__(self, upstream: str, log: list):
        self.upstream = upstream
        self.log = log
        self.host = ""  # the adapter's host:port, set once it is listening
        self._append_lock = threading.Lock()

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path, _, raw_query = environ["RAW_URI"].partition("?")  # keys stay as the client encoded them
        hostname = environ.get("HTTP_HOST", "").split(":")[0]
        if hostname not in (HOST, "localhost") and "." in hostname:
            path = "/" + hostname.split(".")[0] + path
        self.log.append((method, path + ("?" + raw_query if raw_query else "")))
        headers = {}
        for name, value in environ.items():
            if name.startswith("HTTP_") or name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                name = name.removeprefix("HTTP_").replace("_", "-").lower()
                headers["x-amz-" + name[6:] if name.startswith("x-oss-") else name] = value
        for name in ("host", "content-length", "transfer-encoding", "connection", "expect"):
            headers.pop(name, None)
        body = get_input_stream(environ).read()  # bounded by Content-Length / chunking

        if not headers.get("authorization", "").startswith("OSS "):
            reply = _oss_error(403, "AccessDenied", "Anonymous access is not allowed.")
        else:
            # moto checks no signature but parses a "/"-separated credential scope out of
            # the header; a base64 signature with four "/" in it reads as another service.
            access_key = headers["authorization"][4:].rsplit(":", 1)[0]
            headers["authorization"] = f"AWS {access_key}:signature"
            query = dict(parse_qsl(raw_query, keep_blank_values=True))
            reply = self._handle(method, path, query, headers, body)

        status, reply_headers, reply_body = reply
        out = [("x-oss-request-id", uuid.uuid4().hex)]
        for name, value in reply_headers:
            name = name.lower()
            if name in ("connection", "transfer-encoding", "server", "date", "content-length"):
                continue  # werkzeug sets its own; the body may have been rewritten
            out.append(("x-oss-" + name[6:] if name.startswith("x-amz-") else name, value))
        if method == "HEAD":  # keep the object's size, not that of the empty body
            out += [(k.lower(), v) for k, v in reply_headers if k.lower() == "content-length"]
        else:
            out.append(("content-length", str(len(reply_body))))
        start_response(f"{status} {HTTPStatus(status).phrase}", out)
        return [reply_body]

    def _handle(self, method, path, query, headers, body):
        is_bucket = path.strip("/") and "/" not in path.strip("/")
        if "bucketInfo" in query:
            return self._bucket_info(path, headers)
        if method == "POST" and "append" in query:
            return self._append(path, int(query.get("position", 0)), headers, body)
        if method == "GET" and is_bucket and set(query) <= _LIST_PARAMS:
            return self._list_v1(path, query, headers)
        query.pop("objectMeta", None)
        return self._forward(method, path, query, headers, body)

    def _forward(self, method, path, query, headers, body=b""):
        qs = urlencode(query, quote_via=quote)
        status, reply_headers, reply_body = _http(
            self.upstream, method, path + ("?" + qs if qs else ""), headers, body
        )
        if reply_body.lstrip().startswith(b"<"):
            with contextlib.suppress(ET.ParseError):
                root = _to_oss_xml(reply_body, self.host)
                reply_body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return status, reply_headers, reply_body

    def _list_v1(self, path, query, headers):
        """OSS ListObjects (V1: marker / NextMarker) served from moto's V2."""
        v2 = {"list-type": "2", "max-keys": query.get("max-keys") or "100"}
        for name in ("prefix", "delimiter", "encoding-type"):
            if query.get(name):
                v2[name] = query[name]
        if query.get("marker"):
            v2["start-after"] = query["marker"]
        status, reply_headers, reply_body = self._forward("GET", path, v2, headers)
        if status != 200:
            return status, reply_headers, reply_body
        root = ET.fromstring(reply_body)
        for name in ("NextContinuationToken", "StartAfter", "KeyCount"):
            for el in root.findall(name):
                root.remove(el)
        if root.findtext("IsTruncated") == "true":
            decode = unquote if root.findtext("EncodingType") == "url" else str
            names = [el.text for el in root.iterfind("Contents/Key")]
            names += [el.text for el in root.iterfind("CommonPrefixes/Prefix")]
            ET.SubElement(root, "NextMarker").text = max(names, key=decode)
        return status, reply_headers, ET.tostring(root, encoding="utf-8", xml_declaration=True)

    def _bucket_info(self, path, headers):
        bucket = path.strip("/")
        auth = {"authorization": headers["authorization"]}
        status, _, _ = _http(self.upstream, "HEAD", f"/{bucket}", auth)
        if status != 200:
            return _oss_error(404, "NoSuchBucket", "The specified bucket does not exist.")
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<BucketInfo><Bucket>'
            f"<Name>{bucket}</Name><CreationDate>2000-01-01T00:00:00.000Z</CreationDate>"
            f"<Location>oss-{REGION}</Location><StorageClass>Standard</StorageClass>"
            f"<ExtranetEndpoint>{self.host}</ExtranetEndpoint>"
            f"<IntranetEndpoint>{self.host}</IntranetEndpoint>"
            f"<Owner><DisplayName>{KEY}</DisplayName><ID>{KEY}</ID></Owner>"
            "<AccessControlList><Grant>private</Grant></AccessControlList>"
            "</Bucket></BucketInfo>"
        )
        return 200, [("Content-Type", "application/xml")], body.encode()

    def _append(self, path, position, headers, body):
        """OSS AppendObject on top of S3's whole-object GET and PUT."""
        with self._append_lock:
            auth = {"authorization": headers["authorization"]}
            status, _, current = _http(self.upstream, "GET", path, auth)
            if status == 404:
                current = b""
            elif status != 200:
                return _oss_error(status, "InternalError", f"reading for append: HTTP {status}")
            if position != len(current):
                at = [("x-oss-next-append-position", str(len(current)))]
                return _oss_error(409, "PositionNotEqualToLength", "Position is not equal to file length", at)
            data = current + body
            status, reply_headers, reply_body = _http(self.upstream, "PUT", path, headers, data)
            if status == 200:
                reply_headers.append(("x-oss-next-append-position", str(len(data))))
            return status, reply_headers, reply_body


@contextlib.contextmanager
def _serve(app) -> Iterator[str]:
    """A threaded werkzeug server for ``app`` on a free loopback port."""
    server = make_server(HOST, 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="oss-adapter", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def oss_server() -> Iterator[ObjectStore]:
    """Aliyun OSS on loopback (the adapter above in front of moto), for ossfs / oss2."""
    log: list = []
    with _moto() as upstream:
        adapter = _OssAdapter(upstream, log)
        with _serve(adapter) as endpoint:
            adapter.host = urlsplit(endpoint).netloc
            yield ObjectStore(
                protocol="oss",
                endpoint=endpoint,
                storage_options={"endpoint": endpoint, "key": KEY, "secret": SECRET},
                env={
                    "OSS_ENDPOINT": endpoint,  # the only one ossfs reads
                    "OSS_ACCESS_KEY_ID": KEY,  # these two only oss2's
                    "OSS_ACCESS_KEY_SECRET": SECRET,  # EnvironmentVariableCredentialsProvider reads
                },
                request_log=log,
            )
