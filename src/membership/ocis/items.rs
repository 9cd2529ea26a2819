//! Items in oCIS: what a reva event does not carry (an item's size, kind, etag, and path when
//! the event names it by id), asked of the same API and with the same credentials as
//! membership (`ocis-ingestion.md` §3):
//!
//! - by id: `GET /graph/v1.0/drives/{drive}/items/{item}` (`size` is the tree size of a folder;
//!   the path is `parentReference.path` + `name`);
//! - by path: `PROPFIND /remote.php/dav/spaces/{drive}/{path}`, `Depth: 0` (`oc:size`,
//!   `oc:fileid`, `d:getetag`, `d:resourcetype`);
//! - in the trash bin: `PROPFIND /remote.php/dav/spaces/trash-bin/{drive}/{key}`, `Depth: 0`
//!   (never the Depth-1 listing: its sizes are wrong, ocis#4642), with
//!   `oc:trashbin-original-location`.
//!
//! Every answer is the state **now**, not at the event's time: the caller decides what that
//! makes exact.

use quick_xml::events::Event as Xml;
use serde::Deserialize;

use super::graph::{GraphClient, GraphError, parse, path_segment};

/// What oCIS says of one item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ItemInfo {
    /// `storage$space!opaque`, when the answer names it.
    pub id: Option<String>,
    /// Space-root-relative (`/a/b`), when the answer gives it.
    pub path: Option<String>,
    /// Bytes; a folder's is its tree size.
    pub size: u64,
    pub etag: Option<String>,
    pub folder: bool,
    /// The folder holding it (`storage$space!node`), when the answer names it.
    pub parent_id: Option<String>,
}

const ITEM_PROPS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<d:propfind xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns"><d:prop>
<oc:fileid/><oc:file-parent/><oc:size/><d:getcontentlength/><d:getetag/><d:resourcetype/><oc:trashbin-original-location/>
</d:prop></d:propfind>"#;

impl GraphClient {
    /// An item by its id.
    pub async fn item_by_id(&self, drive_id: &str, item_id: &str) -> Result<ItemInfo, GraphError> {
        let url = format!(
            "{}/graph/v1.0/drives/{}/items/{}",
            self.base,
            path_segment(drive_id),
            path_segment(item_id)
        );
        let body = self.get(&url).await?;
        let Some(item): Option<DriveItem> = parse(&body, &url)? else {
            return Err(GraphError::NotFound(format!("{url}: null item")));
        };
        let parent_id = item
            .parent_reference
            .as_ref()
            .and_then(|p| p.id.clone())
            .filter(|id| !id.is_empty());
        let path = item.parent_reference.and_then(|p| p.path).map(|parent| {
            let parent = parent.trim_end_matches('/');
            let parent = parent.strip_prefix('.').unwrap_or(parent);
            format!("{parent}/{}", item.name.as_deref().unwrap_or_default())
        });
        Ok(ItemInfo {
            id: item.id,
            path,
            size: item.size.unwrap_or(0).max(0) as u64,
            etag: item.etag,
            folder: item.folder.is_some(),
            parent_id,
        })
    }

    /// An item by its space-root-relative path (`/a/b`).
    pub async fn item_by_path(&self, drive_id: &str, path: &str) -> Result<ItemInfo, GraphError> {
        let url = format!(
            "{}/remote.php/dav/spaces/{}{}",
            self.base,
            path_segment(drive_id),
            dav_path(path)
        );
        let body = self.propfind(&url, ITEM_PROPS).await?;
        let mut info = parse_propfind(&body)
            .map_err(|e| GraphError::Unavailable(format!("{url}: unreadable answer: {e}")))?;
        info.path = Some(path.to_owned());
        Ok(info)
    }

    /// An item in a space's trash bin, by its key (the trashed node's opaque id).
    pub async fn trashed_item(&self, drive_id: &str, key: &str) -> Result<ItemInfo, GraphError> {
        let url = format!(
            "{}/remote.php/dav/spaces/trash-bin/{}/{}",
            self.base,
            path_segment(drive_id),
            path_segment(key)
        );
        let body = self.propfind(&url, ITEM_PROPS).await?;
        parse_propfind(&body)
            .map_err(|e| GraphError::Unavailable(format!("{url}: unreadable answer: {e}")))
    }
}

#[derive(Deserialize)]
struct DriveItem {
    id: Option<String>,
    name: Option<String>,
    size: Option<i64>,
    #[serde(rename = "eTag")]
    etag: Option<String>,
    #[serde(rename = "parentReference")]
    parent_reference: Option<ParentReference>,
    folder: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ParentReference {
    id: Option<String>,
    path: Option<String>,
}

/// Each segment of a path percent-encoded, slashes kept; the space root is `/` (the
/// collection's own URL, `…/spaces/{drive}/`, as WebDAV clients ask for it).
fn dav_path(path: &str) -> String {
    let encoded: String = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| format!("/{}", path_segment(s)))
        .collect();
    if encoded.is_empty() {
        "/".to_owned()
    } else {
        encoded
    }
}

/// The first `d:response` of a `Depth: 0` multistatus: size (`oc:size`, else
/// `d:getcontentlength`), id, etag, kind, and a trashed item's original location.
pub fn parse_propfind(body: &[u8]) -> Result<ItemInfo, String> {
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut info = ItemInfo::default();
    let (mut size, mut length) = (None::<u64>, None::<u64>);
    let mut open: Option<Vec<u8>> = None;
    let mut text = String::new();
    let mut responses = 0;
    let mut buf = Vec::new();
    loop {
        match reader
            .read_event_into(&mut buf)
            .map_err(|e| e.to_string())?
        {
            Xml::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                if name == b"response" {
                    responses += 1;
                    if responses > 1 {
                        break;
                    }
                }
                if name == b"collection" {
                    info.folder = true;
                }
                open = Some(name);
                text.clear();
            }
            Xml::Empty(e) if e.local_name().as_ref() == b"collection" => info.folder = true,
            // Entities (`&quot;` in an etag) arrive as events of their own.
            Xml::Text(t) => text.push_str(&t.decode().map_err(|e| e.to_string())?),
            Xml::GeneralRef(r) => {
                if let Some(c) = r.resolve_char_ref().map_err(|e| e.to_string())? {
                    text.push(c);
                } else {
                    let name = r.decode().map_err(|e| e.to_string())?;
                    text.push_str(
                        quick_xml::escape::resolve_predefined_entity(&name).unwrap_or(""),
                    );
                }
            }
            Xml::End(_) => {
                let value = text.trim().to_owned();
                match open.take().as_deref() {
                    Some(b"size") => size = value.parse().ok(),
                    Some(b"getcontentlength") => length = value.parse().ok(),
                    Some(b"getetag") => info.etag = Some(value),
                    Some(b"fileid") => info.id = Some(value),
                    Some(b"file-parent") if !value.is_empty() => info.parent_id = Some(value),
                    Some(b"trashbin-original-location") => {
                        info.path = Some(format!("/{}", value.trim_matches('/')));
                    }
                    _ => {}
                }
                text.clear();
            }
            Xml::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if responses == 0 {
        return Err("no d:response in the multistatus".into());
    }
    info.size = size.or(length).unwrap_or(0);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trashed_folder_answers_its_tree_size_and_where_it_was() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<d:multistatus xmlns:s="http://sabredav.org/ns" xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns">
 <d:response><d:href>/remote.php/dav/spaces/trash-bin/s%24p/k1/</d:href>
  <d:propstat><d:prop>
   <oc:size>4096</oc:size><d:getetag>&quot;abc&quot;</d:getetag>
   <d:resourcetype><d:collection/></d:resourcetype>
   <oc:trashbin-original-location>reports/2026</oc:trashbin-original-location>
  </d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat>
  <d:propstat><d:prop><d:getcontentlength/></d:prop><d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>
 </d:response>
</d:multistatus>"#;
        let info = parse_propfind(body).unwrap();
        assert_eq!(info.size, 4096);
        assert!(info.folder);
        assert_eq!(info.etag.as_deref(), Some("\"abc\""));
        assert_eq!(info.path.as_deref(), Some("/reports/2026"));
    }

    #[test]
    fn a_file_without_oc_size_answers_its_content_length() {
        let body = br#"<d:multistatus xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns"><d:response>
<d:propstat><d:prop><d:getcontentlength>17</d:getcontentlength><oc:fileid>s$p!n</oc:fileid><oc:file-parent>s$p!d</oc:file-parent><d:resourcetype/></d:prop></d:propstat>
</d:response></d:multistatus>"#;
        let info = parse_propfind(body).unwrap();
        assert_eq!((info.size, info.folder), (17, false));
        assert_eq!(info.id.as_deref(), Some("s$p!n"));
        assert_eq!(info.parent_id.as_deref(), Some("s$p!d"));
        assert!(parse_propfind(b"<d:multistatus xmlns:d=\"DAV:\"/>").is_err());
        assert!(parse_propfind(b"<not xml").is_err());
    }

    #[test]
    fn paths_are_encoded_segment_by_segment() {
        assert_eq!(dav_path("/a b/c#d"), "/a%20b/c%23d");
        assert_eq!(dav_path("/"), "/");
    }
}
