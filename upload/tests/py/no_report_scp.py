"""A storage SCP (pynetdicom, a peer we did not write) that accepts every
storage class in every transfer syntax and answers storage commitment
requests with success, but never sends the N-EVENT-REPORT on the
association, as archives that report only on a new association do.

usage: no_report_scp.py LOG   (prints its port, then serves until killed;
appends a line to LOG for each N-ACTION request)
"""
import sys
import threading

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

ae = AE(ae_title="COUNTYPACS")
for cx in StoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.add_supported_context(StorageCommitmentPushModel)
log = sys.argv[1]


def on_action(event):
    with open(log, "a") as f:
        f.write("N-ACTION\n")
    # Success, and no report: the N-EVENT-REPORT is never sent.
    return 0x0000, None


handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_N_ACTION, on_action)]
server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
print(server.server_address[1], flush=True)
threading.Event().wait()
