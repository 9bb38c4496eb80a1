import { APIRequestContext, expect, Page } from "@playwright/test";

let counter = 0;

/** A member of our own, so tests never depend on each other's data. Returns its id and the
 *  position of its enrolment (for read-your-writes: `/members/{id}?min_position=…`). */
export async function enrollAt(request: APIRequestContext, name: string): Promise<{ id: string; position: number }> {
  const id = `e2e-${Date.now().toString(36)}-${process.pid}-${counter++}`;
  const response = await request.post("/api/members", {
    data: { member_id: id, name, email: `${id}@example.com` },
  });
  expect(response.status()).toBe(201);
  const body = await response.json();
  return { id, position: body.position };
}

export async function enroll(request: APIRequestContext, name: string): Promise<string> {
  return (await enrollAt(request, name)).id;
}

/** The staff console card whose heading is `title`. */
export function card(page: Page, title: string) {
  return page.locator("section.card", { has: page.getByRole("heading", { name: title, exact: true }) });
}
