//! `/admin/keys` (admins): the keys of machine clients. A new key's token is shown once, on the
//! page the form comes back to.

use crate::api::{list_keys, CreateKey, RevokeKey};
use crate::components::forms::{failed, staff_gate, Field, Outcome};
use crate::format;
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;

#[component]
pub fn KeysPage() -> impl IntoView {
    if let Some(refused) = staff_gate("/admin/keys", true) {
        return refused;
    }
    let flash = crate::request::take_flash();
    let keys = Resource::new_blocking(|| (), |_| list_keys());
    let (create_error, revoke_error) = (failed::<CreateKey>("create_key"), failed::<RevokeKey>("keys"));
    view! {
        <Title text="Keys: Tally"/>
        <h1>"Keys"</h1>
        <p class="muted">
            "Machine clients (points of sale, web shops, scripts, metrics scrapers) send "
            <code>"Authorization: Bearer <token>"</code> "."
        </p>
        <section class="card action">
            <h2>"Create a key"</h2>
            <form method="post" action=CreateKey::PATH class="form">
                <Field label="Name" name="name" placeholder="Till 3, Oxford Street"/>
                <label class="field">
                    <span>"Role"</span>
                    <select name="role">
                        <option value="channel">"channel: post purchases"</option>
                        <option value="metrics">"metrics: read /metrics"</option>
                        <option value="cdc">"cdc: post change events"</option>
                        <option value="staff">"staff"</option>
                        <option value="admin">"admin"</option>
                    </select>
                </label>
                <button type="submit">"Create key"</button>
            </form>
            <Outcome form="create_key" error=create_error flash=flash.clone()/>
        </section>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || {
                let (flash, revoke_error) = (flash.clone(), revoke_error.clone());
                Suspend::new(async move {
                    match keys.await {
                        Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                        Ok(keys) => view! {
                            <section class="card">
                                <h2>"Keys in use"</h2>
                                <Outcome form="keys" error=revoke_error flash/>
                                <div class="table-wrap">
                                    <table class="keys">
                                        <thead><tr>
                                            <th>"Name"</th><th>"Role"</th><th>"Id"</th><th>"Created"</th><th>"Last used"</th><th></th>
                                        </tr></thead>
                                        <tbody>
                                            {keys.into_iter().map(|key| view! {
                                                <tr>
                                                    <td>{key.name}</td>
                                                    <td><span class="badge">{key.role}</span></td>
                                                    <td><code class="small">{key.id.clone()}</code></td>
                                                    <td>{format::when(&key.created_at)}</td>
                                                    <td>{key.last_used_at.as_deref().map(format::when).unwrap_or_else(|| "never".into())}</td>
                                                    <td>
                                                        <form method="post" action=RevokeKey::PATH class="inline">
                                                            <input type="hidden" name="id" value=key.id/>
                                                            <button type="submit" class="danger small">"Revoke"</button>
                                                        </form>
                                                    </td>
                                                </tr>
                                            }).collect_view()}
                                        </tbody>
                                    </table>
                                </div>
                            </section>
                        }.into_any(),
                    }
                })
            }}
        </Suspense>
    }
    .into_any()
}
