//! The browser's live socket (hydrate only): subscribes to one topic on `/ws` (`member:<id>` for
//! the portal, `operations` for the operations page) and hands what arrives to the page.
//! Reconnects with backoff; on (re)subscribe the server sends the current view at once, so
//! nothing is missed while disconnected. Closed by the server because the
//! visitor's access ended (code 4401: signed out, expired), it does not reconnect: the page
//! reloads, and shows what a signed-out visitor sees.

use crate::views::{member_topic, ClientMessage, ConsumerStatus, MembershipView, OperationsSample, ServerMessage};
use leptos::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use web_sys::{CloseEvent, MessageEvent, WebSocket};

/// The server's close code for "your access ended" (API.md).
const CLOSE_REVOKED: u16 = 4401;

struct Live {
    topic: String,
    /// What to do with each text frame.
    on_text: Rc<dyn Fn(String)>,
    socket: Option<WebSocket>,
    /// Closures must outlive the socket's use of them.
    _handlers: Vec<Closure<dyn FnMut(JsValue)>>,
    retry_ms: i32,
    stopped: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<RefCell<Live>>>> = const { RefCell::new(None) };
}

/// Watch one member; replaces any previous watch.
pub fn watch_member(member_id: String, pushed: RwSignal<Option<MembershipView>>, connected: RwSignal<bool>) {
    if member_id.is_empty() {
        stop();
        return;
    }
    let on_text = move |text: String| match serde_json::from_str::<ServerMessage>(&text) {
        Ok(ServerMessage::View { view, .. }) => {
            // Newest wins: never go back to an older view.
            let newer = pushed.with_untracked(|p| p.as_ref().is_none_or(|p| view.position > p.position));
            if newer {
                pushed.set(Some(view));
            }
        }
        Ok(ServerMessage::Error { code, message, .. }) => {
            web_sys::console::warn_1(&format!("live update error {code}: {message}").into());
        }
        Err(_) => {}
    };
    watch(member_topic(&member_id), Rc::new(on_text), connected);
}

/// Watch the consumers (staff): each sample is added to `samples`, which keeps the last
/// `OPERATIONS_WINDOW`.
pub fn watch_operations(samples: RwSignal<Vec<Vec<ConsumerStatus>>>, connected: RwSignal<bool>) {
    #[derive(serde::Deserialize)]
    struct Frame {
        view: OperationsSample,
    }
    let on_text = move |text: String| {
        if let Ok(frame) = serde_json::from_str::<Frame>(&text) {
            samples.update(|s| {
                s.push(frame.view.items);
                let extra = s.len().saturating_sub(crate::views::OPERATIONS_WINDOW);
                s.drain(..extra);
            });
        }
    };
    watch(crate::views::OPERATIONS_TOPIC.to_string(), Rc::new(on_text), connected);
}

fn watch(topic: String, on_text: Rc<dyn Fn(String)>, connected: RwSignal<bool>) {
    stop();
    let live = Rc::new(RefCell::new(Live {
        topic,
        on_text,
        socket: None,
        _handlers: Vec::new(),
        retry_ms: 500,
        stopped: false,
    }));
    CURRENT.with(|c| *c.borrow_mut() = Some(live.clone()));
    // Leaving the page (a form posted, a link followed): whatever closes the socket now, the page
    // must neither reconnect nor reload over the navigation under way (signing out from this very
    // page closes its socket before the answer arrives).
    if let Some(window) = web_sys::window() {
        let leaving = live.clone();
        let on_leave = Closure::<dyn FnMut(JsValue)>::new(move |_| leaving.borrow_mut().stopped = true);
        let _ = window.add_event_listener_with_callback("beforeunload", on_leave.as_ref().unchecked_ref());
        on_leave.forget();
    }
    connect(live, connected);
}

/// Close the socket (the page is going away).
pub fn stop() {
    if let Some(live) = CURRENT.with(|c| c.borrow_mut().take()) {
        let mut live = live.borrow_mut();
        live.stopped = true;
        if let Some(socket) = live.socket.take() {
            let _ = socket.close();
        }
    }
}

fn socket_url() -> Option<String> {
    let location = web_sys::window()?.location();
    let scheme = if location.protocol().ok()? == "https:" { "wss" } else { "ws" };
    Some(format!("{scheme}://{}/ws", location.host().ok()?))
}

fn connect(live: Rc<RefCell<Live>>, connected: RwSignal<bool>) {
    let Some(url) = socket_url() else { return };
    let Ok(socket) = WebSocket::new(&url) else {
        schedule_reconnect(live, connected);
        return;
    };
    let (topic, on_text) = {
        let l = live.borrow();
        (l.topic.clone(), l.on_text.clone())
    };

    let on_open = {
        let socket = socket.clone();
        let live = live.clone();
        Closure::<dyn FnMut(JsValue)>::new(move |_| {
            live.borrow_mut().retry_ms = 500;
            connected.set(true);
            if let Ok(text) = serde_json::to_string(&ClientMessage::Subscribe(topic.clone())) {
                let _ = socket.send_with_str(&text);
            }
        })
    };
    let on_message = Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
        if let Some(text) = event.dyn_ref::<MessageEvent>().and_then(|e| e.data().as_string()) {
            on_text(text);
        }
    });
    let on_close = {
        let live = live.clone();
        Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
            connected.set(false);
            if live.borrow().stopped {
                return;
            }
            if event.dyn_ref::<CloseEvent>().is_some_and(|e| e.code() == CLOSE_REVOKED) {
                live.borrow_mut().stopped = true;
                if let Some(window) = web_sys::window() {
                    let _ = window.location().reload();
                }
                return;
            }
            schedule_reconnect(live.clone(), connected);
        })
    };
    socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    let mut l = live.borrow_mut();
    l.socket = Some(socket);
    l._handlers = vec![on_open, on_message, on_close];
}

fn schedule_reconnect(live: Rc<RefCell<Live>>, connected: RwSignal<bool>) {
    let delay = {
        let mut l = live.borrow_mut();
        if l.stopped {
            return;
        }
        l.socket = None;
        let d = l.retry_ms;
        l.retry_ms = (l.retry_ms * 2).min(10_000);
        d
    };
    let Some(window) = web_sys::window() else { return };
    let retry = Closure::once_into_js(move || {
        if !live.borrow().stopped {
            connect(live, connected);
        }
    });
    let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(retry.unchecked_ref(), delay);
}
