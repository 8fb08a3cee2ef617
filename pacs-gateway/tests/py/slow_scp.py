"""A storage SCP that takes SECONDS to answer each C-STORE (pynetdicom): a
slow C-MOVE destination (storage that is slow to keep, a router forwarding
before it answers).

usage: slow_scp.py AE_TITLE SECONDS
Prints "listening on PORT", then "received" as each C-STORE arrives; serves
until killed.
"""
import sys
import time

from pynetdicom import AE, AllStoragePresentationContexts, evt

title, delay = sys.argv[1], float(sys.argv[2])


def on_store(event):
    print("received", flush=True)
    time.sleep(delay)
    return 0x0000


ae = AE(ae_title=title)
ae.supported_contexts = AllStoragePresentationContexts
server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
print(f"listening on {server.server_address[1]}", flush=True)
while True:
    time.sleep(1)
