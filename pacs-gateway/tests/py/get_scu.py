"""C-GET SCU with pynetdicom (a client we did not write).

usage: get_scu.py PORT CALLING_AE STUDY_UID OUT_DIR
Retrieves a study (Study Root, STUDY level) over the same association and
writes each received dataset as OUT_DIR/<SOP Instance UID>.bin (raw dataset
bytes in the negotiated transfer syntax); prints JSON with the final status
and the sub-operation counts.
"""
import json
import os
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

port, calling, study, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
received = []


def on_store(event):
    ds_bytes = event.request.DataSet.getvalue()
    uid = event.request.AffectedSOPInstanceUID
    with open(os.path.join(out_dir, f"{uid}.bin"), "wb") as f:
        f.write(ds_bytes)
    received.append(str(uid))
    return 0x0000


ae = AE(ae_title=calling)
ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
assoc = ae.associate(
    "127.0.0.1", port, ae_title="COUNTYPACS",
    ext_neg=[build_role(CTImageStorage, scp_role=True)],
    evt_handlers=[(evt.EVT_C_STORE, on_store)],
)
assert assoc.is_established, "association failed"
query = Dataset()
query.QueryRetrieveLevel = "STUDY"
query.StudyInstanceUID = study
final = None
for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
    if status and int(status.Status) not in (0xFF00, 0xFF01):
        final = status
assoc.release()
print(json.dumps({
    "status": int(final.Status) if final else -1,
    "completed": int(final.get("NumberOfCompletedSuboperations", 0)) if final else -1,
    "failed": int(final.get("NumberOfFailedSuboperations", 0)) if final else -1,
    "received": received,
}))
