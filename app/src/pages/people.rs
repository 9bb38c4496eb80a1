//! `/admin/people` (admins): the accounts of the people who run the programme. A new account's
//! access link (to set its password) is shown once, on the page the form comes back to.

use crate::api::{list_people, ChangePerson, CreatePerson};
use crate::components::forms::{failed, staff_gate, Field, Outcome};
use leptos::prelude::*;
use leptos::server_fn::ServerFn;
use leptos_meta::Title;

#[component]
pub fn PeoplePage() -> impl IntoView {
    if let Some(refused) = staff_gate("/admin/people", true) {
        return refused;
    }
    let flash = crate::request::take_flash();
    let people = Resource::new_blocking(|| (), |_| list_people());
    let (create_error, change_error) = (failed::<CreatePerson>("create_person"), failed::<ChangePerson>("people"));
    view! {
        <Title text="People: Tally"/>
        <h1>"People"</h1>
        <section class="card action">
            <h2>"Add a person"</h2>
            <form method="post" action=CreatePerson::PATH class="form">
                <Field label="Name" name="name"/>
                <Field label="Email" name="email" kind="email"/>
                <label class="field">
                    <span>"Role"</span>
                    <select name="role">
                        <option value="staff">"staff"</option>
                        <option value="admin">"admin: staff, plus keys, people and operations"</option>
                    </select>
                </label>
                <button type="submit">"Add"</button>
            </form>
            <Outcome form="create_person" error=create_error flash=flash.clone()/>
        </section>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || {
                let (flash, change_error) = (flash.clone(), change_error.clone());
                Suspend::new(async move {
                    match people.await {
                        Err(err) => view! { <p class="form-error" role="alert">{err.message}</p> }.into_any(),
                        Ok(people) => view! {
                            <section class="card">
                                <h2>"Accounts"</h2>
                                <Outcome form="people" error=change_error flash/>
                                <div class="table-wrap">
                                    <table class="people">
                                        <thead><tr><th>"Name"</th><th>"Email"</th><th>"Role"</th><th>"State"</th><th></th></tr></thead>
                                        <tbody>
                                            {people.into_iter().map(|p| {
                                                let other_role = if p.role == "admin" { "staff" } else { "admin" };
                                                let toggle = if p.disabled { "enable" } else { "disable" };
                                                let change_button = move |what: &'static str, label: String, id: String| view! {
                                                    <form method="post" action=ChangePerson::PATH class="inline">
                                                        <input type="hidden" name="id" value=id/>
                                                        <input type="hidden" name="change" value=what/>
                                                        <button type="submit" class="secondary small">{label}</button>
                                                    </form>
                                                };
                                                view! {
                                                    <tr>
                                                        <td>{p.name}</td>
                                                        <td>{p.email}</td>
                                                        <td><span class="badge">{p.role.clone()}</span></td>
                                                        <td>{if p.disabled { "disabled" } else { "active" }}</td>
                                                        <td class="actions">
                                                            {change_button(other_role, format!("Make {other_role}"), p.id.clone())}
                                                            {change_button(toggle, toggle.to_string(), p.id.clone())}
                                                            {change_button("link", "Reset link".to_string(), p.id)}
                                                        </td>
                                                    </tr>
                                                }
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
