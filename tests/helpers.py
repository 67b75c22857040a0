"""Helpers shared by several test files."""

import functools
import hashlib
import http.server
import sys
import threading
import types

import safetensors.torch
import torch

# Imported here, at collection: importing torchvision (which loads triton's LLVM) after JAX has
# compiled something crashes the process.
import torchvision

# Where the Hugging Face Hub serves timm's torchvision ResNet-18 ("imagenet" for resnet18).
HUB_RESNET18 = "/timm/resnet18.tv_in1k/resolve/main/model.safetensors"


class Hub:
    """A local HTTP server standing in for the Hugging Face Hub (tests need no network):
    `routes[path] = (status, headers, body)`; records every request."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body):
                hub.requests.append((self.command, self.path))
                status, headers, data = hub.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                headers = {"Content-Length": str(len(data)), **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve_like_the_hub(self, path, data, sha256=None, size=None):
        """As huggingface.co serves LFS files: a 302 to storage, hash and size on the first hop."""
        blob = "/storage/" + hashlib.sha256(path.encode()).hexdigest()
        self.routes[path] = (
            302,
            {
                "Location": self.url + blob,
                "X-Linked-Etag": f'"{sha256 or hashlib.sha256(data).hexdigest()}"',
                "X-Linked-Size": str(len(data) if size is None else size),
            },
            b"",
        )
        self.routes[blob] = (200, {}, data)

    def downloads(self):
        return [path for method, path in self.requests if method == "GET"]


def randomize_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics and affines, and conv biases, unlike their initial values (so that a
    parity test shows each one), drawn from torch's current seed; the model in eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@functools.cache
def resnet18_safetensors() -> bytes:
    """A randomised torchvision ResNet-18 (timm's resnet18.tv_in1k is torchvision's file) as
    .safetensors bytes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():  # statistics unlike the defaults, so loading them shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return safetensors.torch.save(model.state_dict())


class _NoOps(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def allow_mmseg_import() -> None:
    """mmcv-lite has no compiled ops, yet mmseg imports some at import; the parts of mmseg the
    tests run use none, so a stand-in `mmcv.ops` of empty classes lets it import."""
    sys.modules.setdefault("mmcv.ops", _NoOps("mmcv.ops"))
