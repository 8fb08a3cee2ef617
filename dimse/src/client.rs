//! The requestor side of an association: A-ASSOCIATE-RQ, DIMSE messages
//! over the accepted presentation contexts, A-RELEASE.

use std::collections::HashMap;
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason as Asce,
    AssociationRJServiceProviderPresentationReason as Presentation,
    AssociationRJServiceUserReason as User, AssociationRJSource, AssociationRQ, Pdu,
    PresentationContextProposed, PresentationContextResultReason, UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::command::Command;
use crate::ul::{self, Incoming, PduReader, UlError};

/// Application context of DICOM.
const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
/// Implementation Class UID of this project's SCUs.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.245208735227353112479946613823418770734";

/// A presentation context to propose.
#[derive(Debug, Clone)]
pub struct Proposed {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

/// Why an association could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the center refused the association: {}", describe_rejection(.0))]
    Rejected(AssociationRJ),
    #[error("the center aborted the association")]
    Aborted,
    #[error("the center released the association")]
    Released,
    #[error("timed out waiting for the center")]
    Timeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Ul(#[from] UlError),
}

impl ClientError {
    /// True when trying again later may succeed (connection trouble,
    /// transient rejection), false for refusals that will not change.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Rejected(rj) => rj.result == AssociationRJResult::Transient,
            ClientError::Protocol(_) => false,
            _ => true,
        }
    }

    /// A transient A-ASSOCIATE-RJ: the center is there but admits no
    /// more associations now (its limits per clinic or in all).
    pub fn is_transient_rejection(&self) -> bool {
        matches!(self, ClientError::Rejected(rj) if rj.result == AssociationRJResult::Transient)
    }
}

/// An A-ASSOCIATE-RJ in words a technician can act on.
pub fn describe_rejection(rj: &AssociationRJ) -> String {
    let kind = match rj.result {
        AssociationRJResult::Permanent => "permanently",
        AssociationRJResult::Transient => "for now (transient)",
    };
    let reason = match &rj.source {
        AssociationRJSource::ServiceUser(User::CallingAETitleNotRecognized) => {
            "calling AE title not recognized by the center (is this clinic registered, and sending from its registered address?)"
                .to_string()
        }
        AssociationRJSource::ServiceUser(User::CalledAETitleNotRecognized) => {
            "called AE title is not the center's".to_string()
        }
        AssociationRJSource::ServiceUser(User::ApplicationContextNameNotSupported) => {
            "application context not supported".to_string()
        }
        AssociationRJSource::ServiceUser(other) => format!("{other}"),
        AssociationRJSource::ServiceProviderASCE(Asce::ProtocolVersionNotSupported) => {
            "protocol version not supported".to_string()
        }
        AssociationRJSource::ServiceProviderASCE(other) => format!("{other}"),
        AssociationRJSource::ServiceProviderPresentation(Presentation::LocalLimitExceeded) => {
            "the center's association limit is reached".to_string()
        }
        AssociationRJSource::ServiceProviderPresentation(Presentation::TemporaryCongestion) => {
            "the center is congested".to_string()
        }
        AssociationRJSource::ServiceProviderPresentation(other) => format!("{other}"),
    };
    format!("{kind}: {reason}")
}

/// A DIMSE message received: its command and, when present, its dataset.
#[derive(Debug)]
pub struct Message {
    pub context_id: u8,
    pub command: Command,
    pub dataset: Option<Vec<u8>>,
}

/// An established association, as requestor.
#[derive(Debug)]
pub struct Association {
    stream: TcpStream,
    reader: PduReader,
    /// Accepted contexts: id -> (abstract syntax, transfer syntax).
    pub accepted: HashMap<u8, (String, String)>,
    /// Largest PDU the acceptor takes (0 = unlimited).
    pub peer_max_pdu: u32,
    /// Abstract syntaxes for which the acceptor agreed that we act as SCP
    /// (SCP/SCU role selection, PS3.7 D.3.3.4; without its answer the
    /// default roles hold and we are SCU only).
    pub scp_role_accepted: Vec<String>,
    timeout: Duration,
}

/// Requests an association proposing `contexts`.
pub async fn associate(
    addr: (&str, u16),
    calling_ae: &str,
    called_ae: &str,
    contexts: &[Proposed],
    max_pdu: u32,
    timeout: Duration,
) -> Result<Association, ClientError> {
    associate_with_scp_role(addr, calling_ae, called_ae, contexts, &[], max_pdu, timeout).await
}

/// Like [`associate`], also proposing the SCP role for `scp_role_for`
/// (PS3.7 D.3.3.4), e.g. to send a storage commitment report on a new
/// association.
pub async fn associate_with_scp_role(
    addr: (&str, u16),
    calling_ae: &str,
    called_ae: &str,
    contexts: &[Proposed],
    scp_role_for: &[&str],
    max_pdu: u32,
    timeout: Duration,
) -> Result<Association, ClientError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(UlError::from)?;
    let _ = stream.set_nodelay(true);
    let mut assoc = Association {
        stream,
        reader: PduReader::new(max_pdu),
        accepted: HashMap::new(),
        peer_max_pdu: 0,
        scp_role_accepted: Vec::new(),
        timeout,
    };
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling_ae.to_string(),
        called_ae_title: called_ae.to_string(),
        application_context_name: APPLICATION_CONTEXT.to_string(),
        presentation_contexts: contexts
            .iter()
            .map(|c| PresentationContextProposed {
                id: c.id,
                abstract_syntax: c.abstract_syntax.clone(),
                transfer_syntaxes: c.transfer_syntaxes.clone(),
            })
            .collect(),
        user_variables: [
            UserVariableItem::MaxLength(max_pdu),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName("CONSORTIUM_SCU".to_string()),
        ]
        .into_iter()
        .chain(scp_role_for.iter().map(|uid| {
            UserVariableItem::ScuScpRoleSelectionSubItem(
                uid.to_string(),
                dicom_ul::pdu::RequestorRoles {
                    scu: false,
                    scp: true,
                },
            )
        }))
        .collect(),
    });
    ul::send(&mut assoc.stream, &rq).await?;
    match assoc.next().await? {
        Incoming::Other(Pdu::AssociationAC(ac)) => {
            for pc in ac.presentation_contexts {
                if pc.reason == PresentationContextResultReason::Acceptance
                    && let Some(p) = contexts.iter().find(|c| c.id == pc.id)
                {
                    // UIDs may arrive padded with NUL to an even length.
                    let ts = pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_string();
                    assoc
                        .accepted
                        .insert(pc.id, (p.abstract_syntax.clone(), ts));
                }
            }
            assoc.peer_max_pdu = ac
                .user_variables
                .iter()
                .find_map(|v| match v {
                    UserVariableItem::MaxLength(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(0);
            assoc.scp_role_accepted = ac
                .user_variables
                .iter()
                .filter_map(|v| match v {
                    UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles)
                        if roles.scp
                            && scp_role_for
                                .iter()
                                .any(|s| uid.trim_end_matches('\0') == *s) =>
                    {
                        Some(uid.trim_end_matches('\0').to_string())
                    }
                    _ => None,
                })
                .collect();
            Ok(assoc)
        }
        Incoming::Other(Pdu::AssociationRJ(rj)) => Err(ClientError::Rejected(rj)),
        Incoming::Other(Pdu::AbortRQ { .. }) => Err(ClientError::Aborted),
        _ => Err(ClientError::Protocol(
            "unexpected answer to A-ASSOCIATE-RQ".into(),
        )),
    }
}

impl Association {
    async fn next(&mut self) -> Result<Incoming, ClientError> {
        match tokio::time::timeout(self.timeout, self.reader.next(&mut self.stream)).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Ok(Some(pdu))) => Ok(pdu),
            Ok(Ok(None)) => Err(ClientError::Ul(UlError::UnexpectedEof)),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// The accepted context for `abstract_syntax` in `transfer_syntax`.
    pub fn context_for(&self, abstract_syntax: &str, transfer_syntax: &str) -> Option<u8> {
        self.accepted
            .iter()
            .filter(|(_, (a, t))| a == abstract_syntax && t == transfer_syntax)
            .map(|(id, _)| *id)
            .min()
    }

    /// Sends a command set.
    pub async fn send_command(
        &mut self,
        context_id: u8,
        command: &[u8],
    ) -> Result<(), ClientError> {
        ul::send_message(
            &mut self.stream,
            context_id,
            true,
            command,
            self.peer_max_pdu,
        )
        .await?;
        Ok(())
    }

    /// Sends a command and its in-memory dataset, gathered into the same
    /// writes (a C-STORE-RQ and the start of its data in one system call).
    pub async fn send_command_and_dataset(
        &mut self,
        context_id: u8,
        command: &[u8],
        dataset: &[u8],
    ) -> Result<(), ClientError> {
        ul::send_command_and_dataset(
            &mut self.stream,
            context_id,
            command,
            dataset,
            self.peer_max_pdu,
        )
        .await?;
        Ok(())
    }

    /// Sends an in-memory dataset.
    pub async fn send_dataset(
        &mut self,
        context_id: u8,
        dataset: &[u8],
    ) -> Result<(), ClientError> {
        ul::send_message(
            &mut self.stream,
            context_id,
            false,
            dataset,
            self.peer_max_pdu,
        )
        .await?;
        Ok(())
    }

    /// Streams a `len`-byte dataset from `source`, one PDU at a time.
    pub async fn send_dataset_from<R: AsyncRead + Unpin>(
        &mut self,
        context_id: u8,
        mut source: R,
        len: u64,
    ) -> Result<(), ClientError> {
        let max = ul::max_fragment(self.peer_max_pdu);
        let mut buf = vec![0u8; max];
        let mut left = len;
        if left == 0 {
            return Err(ClientError::Protocol("empty dataset".into()));
        }
        while left > 0 {
            let n = (left as usize).min(max);
            source
                .read_exact(&mut buf[..n])
                .await
                .map_err(UlError::from)?;
            left -= n as u64;
            ul::send_pdv(&mut self.stream, context_id, false, left == 0, &buf[..n]).await?;
        }
        Ok(())
    }

    /// Receives the next DIMSE message, waiting up to `wait` for each PDU
    /// instead of the association's usual timeout (an answer known to take
    /// long, such as a storage commitment report).
    pub async fn receive_within(
        &mut self,
        max_dataset: usize,
        wait: Duration,
    ) -> Result<Message, ClientError> {
        let usual = std::mem::replace(&mut self.timeout, wait);
        let received = self.receive(max_dataset).await;
        self.timeout = usual;
        received
    }

    /// Receives the next DIMSE message (datasets up to `max_dataset` bytes).
    pub async fn receive(&mut self, max_dataset: usize) -> Result<Message, ClientError> {
        let mut command = Vec::new();
        let mut dataset: Option<Vec<u8>> = None;
        let mut parsed: Option<(u8, Command)> = None;
        loop {
            let body = match self.next().await? {
                Incoming::PData(body) => body,
                Incoming::Other(Pdu::AbortRQ { .. }) => return Err(ClientError::Aborted),
                Incoming::Other(Pdu::ReleaseRQ) => {
                    let _ = ul::send(&mut self.stream, &Pdu::ReleaseRP).await;
                    return Err(ClientError::Released);
                }
                Incoming::Other(_) => return Err(ClientError::Protocol("unexpected PDU".into())),
            };
            let pdvs = ul::pdvs(body)?;
            for (i, pdv) in pdvs.iter().enumerate() {
                // PDVs after the end of this message start the next one.
                let rest = &pdvs[i + 1..];
                if pdv.is_command {
                    if command.len() + pdv.data.len() > crate::command::MAX_COMMAND_BYTES {
                        return Err(ClientError::Protocol("command set too large".into()));
                    }
                    command.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let cmd = Command::parse(&command)
                            .map_err(|e| ClientError::Protocol(e.to_string()))?;
                        if !cmd.has_dataset() {
                            self.reader.unread(rest);
                            return Ok(Message {
                                context_id: pdv.context_id,
                                command: cmd,
                                dataset: None,
                            });
                        }
                        parsed = Some((pdv.context_id, cmd));
                    }
                } else {
                    let data = dataset.get_or_insert_with(Vec::new);
                    if parsed.is_none() || data.len() + pdv.data.len() > max_dataset {
                        return Err(ClientError::Protocol(
                            "unexpected or oversized dataset".into(),
                        ));
                    }
                    data.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let (context_id, command) = parsed.take().expect("checked above");
                        self.reader.unread(rest);
                        return Ok(Message {
                            context_id,
                            command,
                            dataset,
                        });
                    }
                }
            }
        }
    }

    /// A-RELEASE; waits briefly for the reply.
    pub async fn release(mut self) {
        if ul::send(&mut self.stream, &Pdu::ReleaseRQ).await.is_ok() {
            // Until the A-RELEASE-RP (or anything else that ends it); data
            // still arriving, or given back unread, is passed over.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(Incoming::PData(_))) = self.reader.next(&mut self.stream).await {}
            })
            .await;
        }
    }

    /// A-ABORT.
    pub async fn abort(mut self) {
        ul::abort(
            &mut self.stream,
            dicom_ul::pdu::AbortRQServiceProviderReason::ReasonNotSpecified,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Response, field};
    use dicom_ul::pdu::{AssociationAC, PresentationContextResult};

    const COMMITMENT: &str = "1.2.840.10008.1.20.1";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    fn pdv(out: &mut Vec<u8>, is_command: bool, data: &[u8]) {
        out.extend_from_slice(&(2 + data.len() as u32).to_be_bytes());
        out.extend_from_slice(&[1, u8::from(is_command) | 0x02]);
        out.extend_from_slice(data);
    }

    /// A peer may put the end of one message and the next message in one
    /// P-DATA-TF (PS3.8 9.3.5): here an N-ACTION-RSP and the N-EVENT-REPORT
    /// that follows it. Both must be received, in order.
    #[tokio::test]
    async fn two_messages_in_one_pdu_are_both_received() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut reader = PduReader::new(16_384);
            let Some(Incoming::Other(Pdu::AssociationRQ(rq))) =
                reader.next(&mut stream).await.unwrap()
            else {
                panic!("expected A-ASSOCIATE-RQ")
            };
            let ac = Pdu::AssociationAC(AssociationAC {
                protocol_version: 1,
                calling_ae_title: rq.calling_ae_title,
                called_ae_title: rq.called_ae_title,
                application_context_name: APPLICATION_CONTEXT.to_string(),
                presentation_contexts: vec![PresentationContextResult {
                    id: 1,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: EXPLICIT_LE.to_string(),
                }],
                user_variables: vec![UserVariableItem::MaxLength(16_384)],
            });
            ul::send(&mut stream, &ac).await.unwrap();
            let mut body = Vec::new();
            let action_rsp = Response::new(field::N_ACTION_RSP, 1, 0).encode();
            pdv(&mut body, true, &action_rsp);
            let report = Response::request(field::N_EVENT_REPORT_RQ, 7, true).encode();
            pdv(&mut body, true, &report);
            pdv(
                &mut body,
                false,
                &[0x08, 0x00, 0x18, 0x00, b'U', b'I', 2, 0, b'1', 0],
            );
            let mut pdu = vec![0x04, 0];
            pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
            pdu.extend_from_slice(&body);
            tokio::io::AsyncWriteExt::write_all(&mut stream, &pdu)
                .await
                .unwrap();
            // Hold the connection until the client is done.
            let _ = reader.next(&mut stream).await;
        });
        let contexts = [Proposed {
            id: 1,
            abstract_syntax: COMMITMENT.to_string(),
            transfer_syntaxes: vec![EXPLICIT_LE.to_string()],
        }];
        let timeout = Duration::from_secs(10);
        let mut assoc = associate(("127.0.0.1", port), "A", "B", &contexts, 16_384, timeout)
            .await
            .unwrap();
        let first = assoc.receive(1 << 20).await.unwrap();
        assert_eq!(first.command.command_field(), Some(field::N_ACTION_RSP));
        assert!(first.dataset.is_none());
        let second = assoc.receive(1 << 20).await.unwrap();
        assert_eq!(
            second.command.command_field(),
            Some(field::N_EVENT_REPORT_RQ)
        );
        assert_eq!(second.command.message_id(), 7);
        assert_eq!(second.dataset.unwrap().len(), 10);
        assoc.abort().await;
        peer.await.unwrap();
    }
}
